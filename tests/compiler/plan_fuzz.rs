//! Property tests: the parser and the geometry never panic, whatever they are given, and
//! valid plans always produce a layout with the documented properties. Plans read for a
//! model (`load_for_model`, what `moac generate --plan` does) from files of mutated
//! bytes (either plan form; bytes flipped, inserted, removed, the file cut, invalid
//! UTF-8) give an error naming the plan, or a plan of exactly the model's shape.
#![allow(clippy::unwrap_used)]

use moac::geometry::{capacity, CacheGeometry};
use moac::plan::{self, ModelShape, Settings};
use proptest::prelude::*;
use std::path::Path;

const VALID: &str = r#"{"format": "moac-plan", "version": 1, "model": {"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 64}, "alphas": [[0, 0, 1024, -1024], [0, 0, 0, 0]], "betas": [[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]]}"#;

const VALID_MOA: &str = r#"{"alphas": [[0, 0, 1024, -1024], [0, 0, 0, 0]], "betas": [[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]], "note": "x"}"#;

/// Byte-level edits of a file: (position, byte, kind) where kind 0 flips the byte to
/// `byte`, 1 inserts it, 2 removes the byte, 3 cuts the file there.
fn mutate_bytes(text: &str, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for &(pos, b, kind) in edits {
        let i = if bytes.is_empty() {
            0
        } else {
            pos % bytes.len()
        };
        match kind % 4 {
            0 if !bytes.is_empty() => bytes[i] = b,
            1 => bytes.insert(i, b),
            2 if !bytes.is_empty() => {
                bytes.remove(i);
            }
            3 => bytes.truncate(i),
            _ => {}
        }
    }
    bytes
}

fn mutate(text: &str, edits: &[(usize, u8)]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for &(pos, b) in edits {
        if bytes.is_empty() {
            break;
        }
        let i = pos % bytes.len();
        match b % 3 {
            0 => {
                bytes.remove(i);
            }
            1 => bytes.insert(i, b" ,[]{}:\"0-e.1x"[(b as usize / 3) % 14]),
            _ => bytes[i] = b" ,[]{}:\"0-e.1x"[(b as usize / 3) % 14],
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_plan_files_for_a_model_fail_cleanly(
        moa in any::<bool>(),
        shape in 0usize..3,
        edits in prop::collection::vec((0usize..400, any::<u8>(), any::<u8>()), 1..5),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("fuzz_alpha_beta.json");
        std::fs::write(&path, mutate_bytes(if moa { VALID_MOA } else { VALID }, &edits)).unwrap();
        // The plans' own shape, one with another layer count, one with other heads.
        let model = [(2, 4, 2), (3, 4, 2), (2, 8, 2)][shape];
        let model = ModelShape { num_layers: model.0, num_query_heads: model.1, num_kv_heads: model.2, head_dim: 64 };
        match plan::load_for_model(&path, model, Path::new("model.gguf")) {
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.contains("fuzz_alpha_beta.json"), "{}", e);
            }
            Ok(p) => {
                prop_assert_eq!(*p.model(), model);
                let _ = CacheGeometry::new(&p, 1000, 24);
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        let _ = plan::load_str(Path::new("fuzz.json"), &text, None);
    }

    #[test]
    fn mutated_plans_never_panic(edits in prop::collection::vec((0usize..400, any::<u8>()), 1..6)) {
        let text = mutate(VALID, &edits);
        if let Ok(p) = plan::load_str(Path::new("fuzz.json"), &text, None) {
            // Whatever passed validation must give a geometry (or a clean error).
            let _ = CacheGeometry::new(&p, 1000, 24);
        }
    }

    #[test]
    fn random_valid_plans_have_sound_geometry(
        kv in 1usize..5, g in 1usize..5, layers in 1usize..4,
        rules in prop::collection::vec((-5000.0f64..20000.0, 0.0f64..1.5), 1..80),
        p in 0u64..70000, m in 0u64..3000,
    ) {
        prop_assume!(p + m >= 1);
        let hq = kv * g;
        let model = ModelShape { num_layers: layers, num_query_heads: hq, num_kv_heads: kv, head_dim: 128 };
        let pick = |i: usize| rules[i % rules.len()];
        let alphas: Vec<Vec<f64>> = (0..layers).map(|l| (0..hq).map(|h| pick(l * hq + h).0).collect()).collect();
        let betas: Vec<Vec<f64>> = (0..layers).map(|l| (0..hq).map(|h| pick(l * hq + h).1).collect()).collect();
        let s = Settings::default();
        let plan = plan::validate(Path::new("gen.json"), model, s, &alphas, &betas).unwrap();
        let geo = CacheGeometry::new(&plan, p, m).unwrap();
        let n = p + m;
        for (l, lg) in geo.layers.iter().enumerate() {
            for (h, &c) in lg.query_capacity.iter().enumerate() {
                prop_assert!(c >= 128 && c % 64 == 0);
                // Independent restatement of section 2 with integer arithmetic after the trunc.
                let span = alphas[l][h] + betas[l][h] * n as f64;
                let t = if span >= n as f64 { n as i128 } else { span.trunc() as i128 };
                let c_ref = ((t.min(n as i128).max(128) + 63) / 64 * 64) as u64;
                prop_assert_eq!(c, c_ref);
                prop_assert_eq!(c, capacity(plan.layer(l)[h], n, &s));
            }
            let mut next = 0;
            for j in 0..kv {
                prop_assert_eq!(lg.kv_capacity[j], *lg.query_capacity[j * g..(j + 1) * g].iter().max().unwrap());
                prop_assert_eq!(lg.kv_offset[j], next);
                next += lg.kv_capacity[j];
            }
            prop_assert_eq!(lg.total_slots, next);
        }
        prop_assert!(geo.kv_bytes(moac::Dtype::F16, 1) <= geo.mha_expanded_kv_bytes(moac::Dtype::F16, 1));
    }
}
