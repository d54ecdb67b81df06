//! Malformed plans and configs: every kind gives an error that names what is wrong and
//! where, a non-zero exit code, and no panic.
#![allow(clippy::unwrap_used)]

use moac_test_support::*;
use std::path::{Path, PathBuf};

const CONFIG_GQA: &str = r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64}"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Runs `moac inspect` and returns stderr, asserting a clean failure (exit 1, not a panic).
fn fails(plan: &Path, config: Option<&Path>) -> String {
    let mut args = vec!["inspect", plan.to_str().unwrap(), "--prompt-len", "100"];
    if let Some(c) = config {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    let out = moac!(&args);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected a clean error exit, got {:?}: {err}",
        out.status
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn good_rows() -> (&'static str, &'static str) {
    (
        "[[0, 0, 1024, 1024], [0, 0, 0, 0]]",
        "[[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]]",
    )
}

#[test]
fn bad_json_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "config.json", CONFIG_GQA);
    let plan = write(
        dir.path(),
        "plan.json",
        "{\"alphas\": [[0, 0, 0, 0],\n  [0, 0,, 0]], \"betas\": []}",
    );
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("plan.json:2:9"), "{err}");
    let cfg_bad = write(
        dir.path(),
        "bad_config.json",
        "{\"num_hidden_layers\": \"two\"}",
    );
    let (a, b) = good_rows();
    let plan = write(
        dir.path(),
        "ok.json",
        &format!("{{\"alphas\": {a}, \"betas\": {b}}}"),
    );
    let err = fails(&plan, Some(&cfg_bad));
    assert!(err.contains("bad_config.json:1:"), "{err}");
    let plan = write(dir.path(), "array.json", "[1, 2]");
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("array.json:1:1") && err.contains("alphas"),
        "{err}"
    );
    let plan = write(
        dir.path(),
        "strings.json",
        "{\"alphas\": [[\"a\"]], \"betas\": [[0]]}",
    );
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("strings.json:1:"), "{err}");
}

#[test]
fn shape_mismatches_name_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "config.json", CONFIG_GQA);
    let plan = write(
        dir.path(),
        "three_layers.json",
        r#"{"alphas": [[0,0,0,0],[0,0,0,0],[0,0,0,0]], "betas": [[0,0,0,0],[0,0,0,0],[0,0,0,0]]}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("3 layers") && err.contains("has 2"), "{err}");
    let plan = write(
        dir.path(),
        "heads.json",
        r#"{"alphas": [[0,0,0,0],[0,0,0]], "betas": [[0,0,0,0],[0,0,0,0]]}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("layer 1:") && err.contains("3 heads") && err.contains("4 query heads"),
        "{err}"
    );
    let plan = write(
        dir.path(),
        "betas_short.json",
        r#"{"alphas": [[0,0,0,0],[0,0,0,0]], "betas": [[0,0,0,0]]}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("\"betas\" has 1"), "{err}");
}

#[test]
fn bad_numbers_name_layer_and_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "config.json", CONFIG_GQA);
    let plan = write(
        dir.path(),
        "neg_beta.json",
        r#"{"alphas": [[0,0,0,0],[0,0,0,0]], "betas": [[0,0,0,0],[0,0,-0.25,0]]}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("layer 1, head 2") && err.contains("beta"),
        "{err}"
    );
    // JSON cannot spell infinity; 1e999 is out of range, reported where it stands.
    let plan = write(
        dir.path(),
        "inf_alpha.json",
        r#"{"alphas": [[0,1e999,0,0],[0,0,0,0]], "betas": [[0,0,0,0],[0,0,0,0]]}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("inf_alpha.json:1:") && err.contains("out of range"),
        "{err}"
    );
}

#[test]
fn non_finite_rules_from_the_api_name_layer_and_head() {
    use moac::plan::{validate, ModelShape, Settings};
    let model = ModelShape {
        num_layers: 2,
        num_query_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let mut alphas = vec![vec![0.0; 4]; 2];
    let mut betas = vec![vec![0.5; 4]; 2];
    alphas[1][2] = f64::NAN;
    let err = validate(
        Path::new("api"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer 1, head 2") && err.contains("alpha must be finite"),
        "{err}"
    );
    alphas[1][2] = f64::INFINITY;
    let err = validate(
        Path::new("api"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer 1, head 2"), "{err}");
    alphas[1][2] = 0.0;
    betas[0][3] = f64::INFINITY;
    let err = validate(
        Path::new("api"),
        model,
        Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer 0, head 3") && err.contains("beta"),
        "{err}"
    );
}

#[test]
fn bad_configs() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = good_rows();
    let plan = write(
        dir.path(),
        "plan.json",
        &format!("{{\"alphas\": {a}, \"betas\": {b}}}"),
    );
    let cfg = write(
        dir.path(),
        "c1.json",
        r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 64}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("c1.json") && err.contains("not a multiple"),
        "{err}"
    );
    let cfg = write(
        dir.path(),
        "c2.json",
        r#"{"num_hidden_layers": 2, "num_attention_heads": 4}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("c2.json") && err.contains("hidden_size"),
        "{err}"
    );
    let cfg = write(
        dir.path(),
        "c3.json",
        r#"{"num_attention_heads": 4, "head_dim": 64}"#,
    );
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("num_hidden_layers"), "{err}");
    let err = fails(&plan, None);
    assert!(err.contains("--config"), "{err}");
    let err = fails(&dir.path().join("missing.json"), None);
    assert!(err.contains("missing.json"), "{err}");
}

#[test]
fn empty_plans() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "config.json", CONFIG_GQA);
    let plan = write(dir.path(), "empty.json", r#"{"alphas": [], "betas": []}"#);
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("empty"), "{err}");
    let plan = write(dir.path(), "nothing.json", "{}");
    let err = fails(&plan, Some(&cfg));
    assert!(err.contains("alphas"), "{err}");
    let plan = write(dir.path(), "blank.json", "");
    let err = fails(&plan, Some(&cfg));
    assert!(
        err.contains("blank.json:1:0") || err.contains("blank.json:1:1"),
        "{err}"
    );
}

fn moac_plan(model: &str, settings: &str, extra: &str) -> String {
    let (a, b) = good_rows();
    format!(
        r#"{{"format": "moac-plan", "version": 1, "model": {model}, {settings} "alphas": {a}, "betas": {b}{extra}}}"#
    )
}

const MODEL: &str = r#"{"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 64}"#;

#[test]
fn moac_format_rejects_unknown_keys_and_bad_versions() {
    let dir = tempfile::tempdir().unwrap();
    // The well-formed file works without --config.
    let ok = write(dir.path(), "ok.json", &moac_plan(MODEL, "", ""));
    let out = moac!(&["inspect", ok.to_str().unwrap(), "--prompt-len", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let p = write(
        dir.path(),
        "extra.json",
        &moac_plan(MODEL, "", r#", "gamma": 1"#),
    );
    let err = fails(&p, None);
    assert!(
        err.contains("extra.json:1:") && err.contains("unknown field `gamma`"),
        "{err}"
    );
    let p = write(
        dir.path(),
        "extra_model.json",
        &moac_plan(
            r#"{"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 64, "rope": 1}"#,
            "",
            "",
        ),
    );
    let err = fails(&p, None);
    assert!(err.contains("unknown field `rope`"), "{err}");
    let p = write(
        dir.path(),
        "extra_settings.json",
        &moac_plan(
            MODEL,
            r#""settings": {"sink": 64, "min_capacity": 128, "granularity": 64, "max_new_tokens": 1024, "x": 0},"#,
            "",
        ),
    );
    let err = fails(&p, None);
    assert!(err.contains("unknown field `x`"), "{err}");
    let p = write(
        dir.path(),
        "v2.json",
        &moac_plan(MODEL, "", "").replace("\"version\": 1", "\"version\": 2"),
    );
    let err = fails(&p, None);
    assert!(err.contains("version 2"), "{err}");
    let p = write(
        dir.path(),
        "fmt.json",
        &moac_plan(MODEL, "", "").replace("moac-plan", "other"),
    );
    let err = fails(&p, None);
    assert!(err.contains("\"format\""), "{err}");
    let p = write(
        dir.path(),
        "sink.json",
        &moac_plan(
            MODEL,
            r#""settings": {"sink": 128, "min_capacity": 128, "granularity": 64, "max_new_tokens": 1024},"#,
            "",
        ),
    );
    let err = fails(&p, None);
    assert!(err.contains("min_capacity"), "{err}");
    let p = write(
        dir.path(),
        "gqa.json",
        &moac_plan(
            r#"{"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 3, "head_dim": 64}"#,
            "",
            "",
        ),
    );
    let err = fails(&p, None);
    assert!(err.contains("not a multiple"), "{err}");
    // A config that disagrees with the file's geometry.
    let cfg = write(
        dir.path(),
        "config.json",
        r#"{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64}"#,
    );
    let err = fails(&ok, Some(&cfg));
    assert!(err.contains("disagrees"), "{err}");
}

#[test]
fn bad_lengths_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ok = write(dir.path(), "ok.json", &moac_plan(MODEL, "", ""));
    for (p, m) in [
        ("0", "0"),
        ("4000000000", "0"),
        ("18446744073709551615", "1"),
    ] {
        let out = moac!(&[
            "inspect",
            ok.to_str().unwrap(),
            "--prompt-len",
            p,
            "--max-new-tokens",
            m,
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("between 1 and"), "{}", stderr(&out));
    }
}
