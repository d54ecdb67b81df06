//! The tokenizer built from SmolLM2-135M's GGUF metadata against the known-correct ids
//! (the model's own Hugging Face tokenizer): plain text, punctuation, digits split one
//! by one (the `smollm` pre-tokenizer), and a ChatML prompt whose control-token strings
//! become their ids. Needs the model (`scripts/setup-model.sh`); with MOAC_REQUIRE_MODEL
//! set (scripts/test.sh sets it) a missing model fails instead of skipping.
#![allow(clippy::unwrap_used)]

use moac_model::gguf::GgufMetadata;
use moac_model::tokenizer::Tokenizer;
use std::path::Path;

fn tokenizer() -> Option<Tokenizer> {
    let path = moac_test_support::smollm2()?;
    Some(Tokenizer::from_gguf(&GgufMetadata::read(&path).unwrap()).unwrap())
}

#[test]
fn smollm2_golden_vectors() {
    let Some(t) = tokenizer() else { return };
    let cases: [(&str, &[u32]); 3] = [
        ("Hello world", &[19556, 905]),
        ("Hello, how are you?", &[19556, 28, 638, 359, 346, 47]),
        (
            "The year 2024 has 366 days.",
            &[
                504, 713, 216, 34, 32, 34, 36, 553, 216, 35, 38, 38, 2009, 30,
            ],
        ),
    ];
    for (text, want) in cases {
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(t.decode(&ids, true).unwrap(), text);
    }
    let chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let want: [u32; 37] = [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
        520, 9531, 198,
    ];
    assert_eq!(t.encode(chat).unwrap(), want);
    assert_eq!(t.decode(&want, true).unwrap(), chat);
    assert_eq!(t.bos, Some(1));
    assert!(t.stop.contains(&2), "{:?}", t.stop);
    assert!(!t.add_bos);
    assert_eq!(t.vocab_size(), 49152);
    // The decoded answer of the known-correct greedy run.
    let answer = t
        .decode(&[504, 3575, 282, 4649, 314, 7042, 30], false)
        .unwrap();
    assert_eq!(answer, "The capital of France is Paris.");
}

#[test]
fn missing_and_foreign_files_are_clear_errors() {
    let e = GgufMetadata::read(Path::new("no/such/model.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no/such/model.gguf"), "{e}");
    let dir = std::env::temp_dir().join(format!("moac-model-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"not a gguf file at all").unwrap();
    let e = GgufMetadata::read(&bad).err().unwrap().to_string();
    assert!(
        e.contains("bad.gguf") && e.contains("not a readable GGUF"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The retrieval tasks' prompts: near the asked length in this tokenizer's tokens, the
/// hidden value present where the depth says, and the answer's last integer parsed.
#[test]
fn retrieval_samples_hit_their_length_and_hide_the_value() {
    use moac_model::eval::last_integer;
    use moac_model::generate::Rng;
    use moac_model::retrieval::{depths, make_sample, Task};
    let Some(t) = tokenizer() else { return };
    let mut rng = Rng::new(5);
    for task in [Task::Passkey, Task::Lines] {
        for target in [1024usize, 3000] {
            for depth in depths(3) {
                let s = make_sample(task, &t, target, depth, &mut rng).unwrap();
                let n = t.encode(&s.user).unwrap().len();
                assert!(
                    n > target * 80 / 100 && n <= target,
                    "{task:?} {target}: {n} tokens"
                );
                let v = s.value.to_string();
                // Where the value sits inside the filler (the record / the haystack).
                let (open, close) = match task {
                    Task::Passkey => ("quiz you about it.\n\n", "\n\nWhat is the pass key?"),
                    Task::Lines => ("record start:\n\n", "\nNow the record is over."),
                };
                let start = s.user.find(open).unwrap() + open.len();
                let end = s.user.rfind(close).unwrap();
                let needle = match task {
                    Task::Passkey => format!("pass key is {v}."),
                    Task::Lines => format!("is <{v}>"),
                };
                let at = s.user[start..].find(&needle).unwrap() as f64 / (end - start) as f64;
                assert!(
                    (at - depth).abs() < 0.05,
                    "{task:?}: value at {at}, depth {depth}"
                );
                if task == Task::Lines {
                    // The asked key names exactly one line, and that line holds the value.
                    let key = s
                        .user
                        .rsplit("in line ")
                        .next()
                        .unwrap()
                        .split('?')
                        .next()
                        .unwrap();
                    let line = format!("line {key}: REGISTER_CONTENT is <{v}>");
                    assert_eq!(s.user.matches(&format!("line {key}:")).count(), 1);
                    assert!(s.user.contains(&line), "{line}");
                }
            }
        }
    }
    assert_eq!(last_integer("The pass key is 71432."), Some(71432));
    assert_eq!(last_integer("line a: 12, so <4,512>"), Some(4512));
    assert_eq!(last_integer("no number"), None);
}
