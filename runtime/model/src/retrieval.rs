//! Retrieval tasks, generated from a seed: MoA's LongEval "lines" (a record of lines
//! `line <adjective-noun>: REGISTER_CONTENT is <n>`, then a question about one line) and
//! a pass key (a number hidden at a depth in filler text). The hidden item's depth is
//! given (spread over the input by the caller); a sample is correct iff the last integer
//! of the model's answer is the value.

use crate::generate::Rng;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Which task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Lines,
    Passkey,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lines" => Ok(Task::Lines),
            "passkey" => Ok(Task::Passkey),
            _ => Err(format!("unknown task {s:?} (lines or passkey)")),
        }
    }
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Lines => "lines",
            Task::Passkey => "passkey",
        }
    }

    /// The start of the answer put in the assistant's turn (SmolLM2-size models
    /// retrieve only when the answer is begun for them).
    pub fn default_answer_prefix(self) -> &'static str {
        match self {
            Task::Lines => "The REGISTER_CONTENT in line",
            Task::Passkey => "The pass key is",
        }
    }
}

/// One generated question.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The user's message.
    pub user: String,
    /// The value the answer must end with.
    pub value: u64,
    /// Where the hidden item sits, as a fraction of the filler (0 = start).
    pub depth: f64,
}

const ADJECTIVES: [&str; 32] = [
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lively", "misty", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy",
    "upper", "vivid", "witty", "young", "zesty", "bold", "crisp", "dense", "early", "fuzzy",
    "grand", "humble",
];
const NOUNS: [&str; 32] = [
    "apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island",
    "jacket", "kettle", "ladder", "meadow", "needle", "orchard", "pencil", "quarry", "river",
    "saddle", "tunnel", "valley", "wagon", "window", "yarrow", "anchor", "basket", "canyon",
    "dragon", "falcon", "glacier", "hammer", "lantern",
];
pub const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// Strings that mark the evaluation's prompts (its templates and filler): calibration
/// must never contain any of them (a test holds it), so that retrieval is measured out of
/// sample.
pub const EVAL_MARKERS: [&str; 10] = [
    "pass key",
    "REGISTER_CONTENT",
    "The grass is green",
    "The sky is blue",
    "The sun is yellow",
    "Here we go",
    "There and back again",
    "irrelevant text",
    "record of lines",
    "line index",
];

/// Tokens the prompt's fixed parts take beyond the filler (instructions, question, chat
/// template, answer prefix), a margin so the whole prompt stays near the target.
const OVERHEAD: usize = 120;

/// A sample of `task` whose chat prompt is about `target_tokens` long, with the hidden
/// item at `depth` (0..1) of the filler.
pub fn make_sample(
    task: Task,
    tok: &Tokenizer,
    target_tokens: usize,
    depth: f64,
    rng: &mut Rng,
) -> Result<Sample> {
    let budget = target_tokens.saturating_sub(OVERHEAD);
    match task {
        Task::Passkey => {
            let value = 10_000 + rng.below(90_000);
            let per = tok.encode(FILLER)?.len().max(1);
            let reps = (budget / per).max(1);
            let at = ((reps as f64) * depth.clamp(0.0, 1.0)).round() as usize;
            let mut hay = String::new();
            for i in 0..=reps {
                if i == at {
                    hay.push_str(&format!(
                        "The pass key is {value}. Remember it. {value} is the pass key. "
                    ));
                }
                if i < reps {
                    hay.push_str(FILLER);
                }
            }
            Ok(Sample {
                user: format!(
                    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n{hay}\n\nWhat is the pass key?"
                ),
                value,
                depth,
            })
        }
        Task::Lines => {
            // Distinct keys: adjective-noun pairs drawn without repetition.
            let mut keys: Vec<(usize, usize)> = (0..ADJECTIVES.len())
                .flat_map(|a| (0..NOUNS.len()).map(move |n| (a, n)))
                .collect();
            for i in (1..keys.len()).rev() {
                keys.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let sample_line = "line brave-meadow: REGISTER_CONTENT is <12345>\n";
            let per = tok.encode(sample_line)?.len().max(1);
            let count = (budget / per).clamp(2, keys.len());
            let lines: Vec<(String, u64)> = keys[..count]
                .iter()
                .map(|&(a, n)| (format!("{}-{}", ADJECTIVES[a], NOUNS[n]), rng.below(50_000)))
                .collect();
            let pick = ((count - 1) as f64 * depth.clamp(0.0, 1.0)).round() as usize;
            let mut record = String::new();
            for (k, v) in &lines {
                record.push_str(&format!("line {k}: REGISTER_CONTENT is <{v}>\n"));
            }
            let (key, value) = &lines[pick];
            Ok(Sample {
                user: format!(
                    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n{record}\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {key}? I need the number."
                ),
                value: *value,
                depth,
            })
        }
    }
}

/// `samples` depths spread over the input: the middles of equal slices.
pub fn depths(samples: usize) -> Vec<f64> {
    (0..samples)
        .map(|i| (i as f64 + 0.5) / samples as f64)
        .collect()
}

/// Parses one input length of `--lengths` (long enough for the task's fixed text).
pub fn parse_length(s: &str) -> std::result::Result<usize, String> {
    let v = s
        .trim()
        .parse::<usize>()
        .map_err(|e| format!("length {s:?}: {e}"))?;
    if v < 2 * OVERHEAD {
        return Err(format!(
            "length {v} is too short (at least {})",
            2 * OVERHEAD
        ));
    }
    Ok(v)
}

/// Checks the sample count.
pub fn check_samples(samples: usize) -> Result<()> {
    if samples == 0 {
        return Err(Error::Usage("--samples must be at least 1".into()));
    }
    Ok(())
}
