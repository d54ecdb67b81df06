//! The default calibration mix on SmolLM2-135M's tokenizer and chat template:
//! - deterministic for a seed (and another seed gives other samples);
//! - every sample respects its length level, counted by the model's tokenizer: the
//!   prompt takes N - max_answer tokens (whole-record haystacks within 64 of it), the
//!   true answers fit the answer room;
//! - every family is there, synthetic facts sit at depths spread over the input, and each
//!   true answer's fact is in its prompt;
//! - no sample contains an evaluation template or evaluation text (the pass key and lines
//!   prompts, their filler, the perplexity prose);
//! - bad input: a source that is not UTF-8, a source too short for the length, lengths
//!   beyond the model's context: a clear error naming what is wrong.
//!
//! Needs the model (`scripts/setup-model.sh`) and the calibration text
//! (`scripts/setup-calib-text.sh`); with MOAC_REQUIRE_MODEL set (scripts/test.sh sets
//! it) their absence fails the test instead of skipping it.
#![allow(clippy::unwrap_used)]

use moac_model::pipeline::calib::{self, CalibOptions, Pending};
use moac_model::pipeline::tasks::{Corpus, Family, DEFAULT_MIX};
use moac_model::retrieval::{self, Task, EVAL_MARKERS};
use moac_model::weights::WeightMode;
use moac_model::Model;
use moac_runtime::reference::check::Rng;

fn setup() -> Option<(Model, (String, String))> {
    let path = moac_test_support::smollm2()?;
    let text = path.parent().unwrap().join("text/factbook.txt");
    if !text.is_file() {
        assert!(
            std::env::var_os("MOAC_REQUIRE_MODEL").is_none(),
            "{} is missing: run scripts/setup-calib-text.sh",
            text.display()
        );
        eprintln!("skipped: no {}", text.display());
        return None;
    }
    let model = Model::load(&path, WeightMode::Native).unwrap();
    Some((model, calib::read_source(&text).unwrap()))
}

fn options(source: &(String, String), seed: u64) -> CalibOptions {
    CalibOptions {
        lengths: vec![1024, 2048],
        samples: 12,
        samples_at: Vec::new(),
        seed,
        max_answer: 128,
        sources: vec![source.clone()],
        families: DEFAULT_MIX.to_vec(),
        batch: 4,
    }
}

#[test]
fn the_default_mix_is_deterministic_sized_and_out_of_sample() {
    let Some((model, source)) = setup() else {
        return;
    };
    let seed = Rng::fresh("calib_mix").next_u64() % 1000;
    let opts = options(&source, seed);
    let a = calib::prompts(&model, &opts).unwrap();
    let b = calib::prompts(&model, &opts).unwrap();
    type Key = (usize, String, Vec<u32>, Option<Vec<u32>>);
    let key = |v: &[(usize, Pending)]| -> Vec<Key> {
        v.iter()
            .map(|(n, p)| (*n, p.id.clone(), p.prompt.clone(), p.truth.clone()))
            .collect()
    };
    assert_eq!(key(&a), key(&b), "same seed, same samples");
    let c = calib::prompts(&model, &options(&source, seed + 1)).unwrap();
    assert_ne!(key(&a), key(&c), "another seed, other samples");
    assert_eq!(a.len(), 24);

    // The evaluation's own prompts, to look for their sentences in calibration.
    let mut rng = Rng::new(5);
    let mut eval_text = String::new();
    for task in [Task::Passkey, Task::Lines] {
        let s = retrieval::make_sample(task, &model.tokenizer, 1024, 0.5, &mut rng).unwrap();
        eval_text.push_str(&s.user);
        eval_text.push('\n');
    }
    // The perplexity evaluation's prose (scripts/eval-common.sh), where the machine has it.
    for f in ["GPL-3", "Apache-2.0", "MPL-2.0"] {
        if let Ok(t) = std::fs::read_to_string(format!("/usr/share/common-licenses/{f}")) {
            eval_text.push_str(&t);
        }
    }
    let words: Vec<&str> = eval_text.split_whitespace().collect();
    // Every 10-word run of the evaluation's text that is specific (not all short words).
    let shingles: Vec<String> = words
        .windows(10)
        .step_by(3)
        .filter(|w| w.iter().filter(|x| x.len() > 4).count() >= 4)
        .map(|w| w.join(" "))
        .collect();
    assert!(shingles.len() > 100);

    let mut families = std::collections::HashMap::<Family, usize>::new();
    for (n, p) in &a {
        let budget = n - opts.max_answer;
        let text = model.tokenizer.decode(&p.prompt, true).unwrap();
        let family = Family::of_task(&p.task).unwrap();
        if p.task.starts_with("kv") {
            assert!(
                p.prompt.len() <= budget && p.prompt.len() + 64 >= budget,
                "{}: {} prompt tokens for {budget}",
                p.id,
                p.prompt.len()
            );
        } else {
            assert_eq!(p.prompt.len(), budget, "{}: prompt tokens", p.id);
        }
        if let Some(t) = &p.truth {
            assert!(t.len() <= opts.max_answer && t.len() >= 3, "{}", p.id);
            assert_eq!(
                t.last().copied(),
                model.tokenizer.stop.first().copied(),
                "{}: a true answer ends the turn",
                p.id
            );
            // The value asked for is in the prompt (the fact was placed, not cut).
            let answer = model.tokenizer.decode(t, false).unwrap();
            let values: Vec<&str> = answer
                .split(|c: char| c.is_whitespace() || c == '"' || c == '.')
                .filter(|w| {
                    w.len() >= 4 && w.chars().any(|c| c.is_ascii_digit() || c.is_uppercase())
                })
                .collect();
            assert!(!values.is_empty(), "{}: {answer}", p.id);
            let lower = text.to_lowercase();
            for v in values {
                assert!(
                    lower.contains(&v.to_lowercase()),
                    "{}: {v:?} of the answer is not in the prompt",
                    p.id
                );
            }
        }
        for m in EVAL_MARKERS {
            assert!(
                !text.to_lowercase().contains(&m.to_lowercase()),
                "{} contains the evaluation's {m:?}",
                p.id
            );
        }
        for s in &shingles {
            assert!(
                !text.contains(s.as_str()),
                "{} contains evaluation text {s:?}",
                p.id
            );
        }
        *families.entry(family).or_default() += 1;
    }
    for f in DEFAULT_MIX {
        assert_eq!(
            families.get(&f),
            Some(&4),
            "family {}: {families:?}",
            f.name()
        );
    }
}

#[test]
fn synthetic_facts_are_spread_over_the_input() {
    let Some((model, source)) = setup() else {
        return;
    };
    let mut opts = options(&source, 3);
    opts.families = vec![Family::Needle];
    opts.lengths = vec![1024];
    opts.samples = 10;
    let made = calib::prompts(&model, &opts).unwrap();
    // Where the fact sits: the first token of its sentence, as a fraction of the prompt.
    let mut depths = Vec::new();
    for (_, p) in &made {
        let text = model.tokenizer.decode(&p.prompt, true).unwrap();
        let answer = model
            .tokenizer
            .decode(p.truth.as_ref().unwrap(), false)
            .unwrap();
        let value = answer
            .trim_end_matches('.')
            .split_whitespace()
            .last()
            .unwrap()
            .to_string();
        let at = text.find(&value).unwrap() as f64 / text.len() as f64;
        depths.push(at);
    }
    depths.sort_by(f64::total_cmp);
    assert!(depths[0] < 0.25, "{depths:?}");
    assert!(depths[depths.len() - 1] > 0.7, "{depths:?}");
}

#[test]
fn prose_samples_are_the_text_and_its_own_continuation() {
    let Some((model, source)) = setup() else {
        return;
    };
    let seed = Rng::fresh("calib_prose").next_u64() % 1000;
    let mut opts = options(&source, seed);
    opts.families = vec![Family::Prose];
    opts.samples = 3;
    let made = calib::prompts(&model, &opts).unwrap();
    assert_eq!(made.len(), 6);
    // The source as the corpus sees it (its paragraphs, headings left out, blank-line
    // separated), twice: a run may wrap around the end.
    let once = Corpus::new(&source.0, &source.1).paragraphs.join("\n\n");
    let text = format!("{once}\n\n{once}");
    let mut starts = std::collections::HashSet::new();
    for (n, p) in &made {
        assert_eq!(p.task, "prose", "{}", p.id);
        assert_eq!(Family::of_task(&p.task), Some(Family::Prose));
        assert_eq!(
            p.prompt.len(),
            n - opts.max_answer,
            "{}: prompt tokens",
            p.id
        );
        let answer = p.truth.as_ref().unwrap();
        assert_eq!(
            answer.len(),
            opts.max_answer,
            "{}: the answer fills its room",
            p.id
        );
        // Plain text, no chat template: prompt and answer decode to one run of the source,
        // the answer exactly where the prompt stops.
        let all: Vec<u32> = p.prompt.iter().chain(answer).copied().collect();
        let marked = model.tokenizer.decode(&all, true).unwrap();
        assert!(
            !marked.contains("<|im_start|>"),
            "{}: a chat template",
            p.id
        );
        let whole = model.tokenizer.decode(&all, false).unwrap();
        assert!(
            text.contains(&whole),
            "{}: not a run of the source: {:?}",
            p.id,
            whole.chars().take(200).collect::<String>()
        );
        let prompt = model.tokenizer.decode(&p.prompt, false).unwrap();
        let rest = model.tokenizer.decode(answer, false).unwrap();
        assert!(text.contains(&format!("{prompt}{rest}")), "{}", p.id);
        starts.insert(whole.chars().take(80).collect::<String>());
    }
    assert_eq!(starts.len(), made.len(), "every sample from its own place");
}

#[test]
fn bad_sources_and_lengths_are_clear_errors() {
    let Some((model, source)) = setup() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bytes.txt");
    std::fs::write(&bin, [b'a', b'b', 0xff, 0xfe, b'\n']).unwrap();
    let e = calib::read_source(&bin).unwrap_err().to_string();
    assert!(e.contains("bytes.txt") && e.contains("not UTF-8"), "{e}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    let e = calib::read_source(&empty).unwrap_err().to_string();
    assert!(
        e.contains("empty.txt") && e.contains("no paragraphs"),
        "{e}"
    );

    let short = (
        "short.txt".to_string(),
        "A few words.\n\nAnd a few more.\n".to_string(),
    );
    let mut opts = options(&short, 1);
    opts.lengths = vec![2048];
    let e = calib::prompts(&model, &opts).err().unwrap().to_string();
    assert!(e.contains("short.txt") && e.contains("too short"), "{e}");

    let mut opts = options(&source, 1);
    opts.lengths = vec![model.llama.config.context_len + 64];
    let e = calib::prompts(&model, &opts).err().unwrap().to_string();
    assert!(e.contains("more than the"), "{e}");
    opts.lengths = vec![200];
    let e = calib::prompts(&model, &opts).err().unwrap().to_string();
    assert!(e.contains("too little room"), "{e}");
}
