//! Property tests: the parser and the geometry never panic, whatever they are given, and
//! valid plans always produce a layout with the documented properties.
#![allow(clippy::unwrap_used)]

use moac::geometry::{capacity, CacheGeometry};
use moac::plan::{self, ModelShape, Settings};
use proptest::prelude::*;
use std::path::Path;

const VALID: &str = r#"{"format": "moac-plan", "version": 1, "model": {"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 2, "head_dim": 64}, "alphas": [[0, 0, 1024, -1024], [0, 0, 0, 0]], "betas": [[0.5, 0.5, 0.25, 0.25], [0.5, 0.5, 0.5, 0.5]]}"#;

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
