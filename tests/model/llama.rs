//! SmolLM2-135M end to end on the cpu backend: the France chat prompt through the dense
//! model (every head's span = N; f32 weights, f16 K/V in moac's compacted cache) gives
//! the known-correct top-5 next tokens with logits within 0.05 of the float32 reference
//! (measured: 0.002), and greedy decoding through moac's decode steps gives the
//! known-correct answer, "The capital of France is Paris.". Needs the model
//! (`scripts/setup-model.sh`; MOAC_REQUIRE_MODEL makes its absence a failure).
#![allow(clippy::unwrap_used)]

use moac_model::llama::Llama;
use moac_runtime::{Artifact, Backend, Runtime};
use std::path::{Path, PathBuf};

fn model_path() -> Option<PathBuf> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("MOAC_REQUIRE_MODEL").is_none(),
        "{} is missing: run scripts/setup-model.sh",
        path.display()
    );
    eprintln!("skipped: no {}", path.display());
    None
}

/// The ChatML prompt "What is the capital of France?" with the default system turn.
const PROMPT: [u32; 37] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
    19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531,
    198,
];

#[test]
fn smollm2_dense_answers_paris() {
    let Some(path) = model_path() else { return };
    let model = Llama::from_gguf(&path, true).unwrap();
    let c = model.config;
    assert_eq!(
        (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (30, 9, 3, 64)
    );
    let plan = model.dense_plan(Path::new("smollm2-dense")).unwrap();
    let art = Artifact::from_plan(&plan, moac::Dtype::F16, None).unwrap();
    let rt = Runtime::new(art, Backend::Cpu).unwrap();
    let new_tokens = 8;
    let mut cache = rt.allocate_cache(1, PROMPT.len(), new_tokens).unwrap();
    let logits = model.forward(&rt, &mut cache, &PROMPT, 0).unwrap();
    let last: Vec<f32> = logits
        .get(PROMPT.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top: Vec<(usize, f32)> = order[..5].iter().map(|&i| (i, last[i])).collect();
    eprintln!("top-5 at the last prompt position: {top:?}");
    // The float32 reference (shared notes): ids and logits.
    let want = [
        (504, 25.325),
        (60, 25.243),
        (15319, 24.942),
        (2219, 24.402),
        (7026, 24.315),
    ];
    let mut got_ids: Vec<usize> = top.iter().map(|t| t.0).collect();
    let mut want_ids: Vec<usize> = want.iter().map(|w| w.0).collect();
    got_ids.sort_unstable();
    want_ids.sort_unstable();
    assert_eq!(got_ids, want_ids, "top-5 set");
    for (id, logit) in want {
        assert!(
            (last[id] - logit).abs() < 0.05,
            "logit of {id}: {} vs {logit}",
            last[id]
        );
    }
    // Greedy decoding through moac's decode steps.
    let mut next = order[0] as u32;
    let mut out = vec![next];
    for step in 0..new_tokens - 1 {
        if next == 2 {
            break;
        }
        let logits = model
            .forward(&rt, &mut cache, &[next], PROMPT.len() + step)
            .unwrap();
        let row = logits.get(0).unwrap().to_vec1::<f32>().unwrap();
        next = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        out.push(next);
    }
    eprintln!("greedy: {out:?}");
    // "The capital of France is Paris." then <|im_end|> (7042 = " Paris").
    assert_eq!(out, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
}
