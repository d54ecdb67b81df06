//! Calibration samples: long inputs with long-range dependencies and an instruction,
//! in the model's chat template, answered by the dense model itself (greedy), fitted to
//! a length level N by dropping the middle of the document. MoA's finding: the model's
//! own answers to long-dependency tasks make far better plans than generic text.
//!
//! The documents are made by moac from a seed (no data set needed; nothing is
//! downloaded): registries of fictional towns whose questions need facts from anywhere
//! in the record, and the whole record's summary; `--source` text files add a summary
//! of real text. They are not the retrieval evaluation's tasks (no "lines" records, no
//! pass keys). A sample's prompt takes N - `max_answer` tokens, so that N = prompt +
//! max_new_tokens as at run time.

use crate::attention::Engine;
use crate::chat::Message;
use crate::generate::{generate, GenerateOptions, Rng, Sampling};
use crate::model::Model;
use crate::{Error, Result};
use std::path::Path;

/// The calibration file's first line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibHeader {
    /// Always "moac-calibration".
    pub format: String,
    pub version: u32,
    /// The model's file or folder name.
    pub model: String,
    pub vocab_size: usize,
    pub seed: u64,
    pub max_answer: usize,
    /// Where the documents came from, with their licenses.
    pub sources: Vec<String>,
}

/// One sample: prompt then the dense model's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibSample {
    /// Unique within the file, e.g. "n2048-03-towns".
    pub id: String,
    /// The length level N the sample stands for.
    pub length: usize,
    pub task: String,
    pub prompt_len: usize,
    /// Prompt then answer ids (the answer ends with the end-of-turn id when the model
    /// stopped).
    pub tokens: Vec<u32>,
    /// The answer as text (for people reading the file).
    pub answer: String,
}

/// A calibration file.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibSet {
    pub header: CalibHeader,
    pub samples: Vec<CalibSample>,
}

pub const FORMAT: &str = "moac-calibration";

/// Provenance of the built-in documents.
pub const GENERATED_SOURCE: &str =
    "moac's generated town registries (made from a seed by moac itself; MIT OR Apache-2.0)";

impl CalibSet {
    /// Reads a calibration file; errors name the file and the line (and column).
    pub fn read(path: &Path) -> Result<CalibSet> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, message: String| Error::Format {
            path: path.to_path_buf(),
            message: format!("line {line}: {message}"),
        };
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, first) = lines
            .next()
            .ok_or_else(|| bad(1, "empty calibration file (no header, no samples)".into()))?;
        let header: CalibHeader = serde_json::from_str(first)
            .map_err(|e| bad(1, format!("header: {e} (column {})", e.column())))?;
        if header.format != FORMAT || header.version != 1 {
            return Err(bad(
                1,
                format!(
                    "not a moac calibration file (format {:?} version {})",
                    header.format, header.version
                ),
            ));
        }
        let mut samples = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for (i, line) in lines {
            let s: CalibSample = serde_json::from_str(line)
                .map_err(|e| bad(i + 1, format!("{e} (column {})", e.column())))?;
            if s.prompt_len == 0 || s.prompt_len >= s.tokens.len() {
                return Err(bad(
                    i + 1,
                    format!(
                        "sample {}: prompt_len {} of {} tokens (a sample needs a prompt and an answer)",
                        s.id,
                        s.prompt_len,
                        s.tokens.len()
                    ),
                ));
            }
            if s.tokens.len() > s.length {
                return Err(bad(
                    i + 1,
                    format!(
                        "sample {}: {} tokens, longer than its length level {}",
                        s.id,
                        s.tokens.len(),
                        s.length
                    ),
                ));
            }
            if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= header.vocab_size) {
                return Err(bad(
                    i + 1,
                    format!("sample {}: token id {id} outside the vocabulary", s.id),
                ));
            }
            if !ids.insert(s.id.clone()) {
                return Err(bad(i + 1, format!("sample id {} appears twice", s.id)));
            }
            samples.push(s);
        }
        if samples.is_empty() {
            return Err(bad(1, "the calibration set has no samples".into()));
        }
        Ok(CalibSet { header, samples })
    }

    /// Writes the file whole (a temporary file renamed into place).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string(&self.header).map_err(json_err)?;
        text.push('\n');
        for s in &self.samples {
            text.push_str(&serde_json::to_string(s).map_err(json_err)?);
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())
    }

    /// The length levels present, ascending.
    pub fn lengths(&self) -> Vec<usize> {
        let mut l: Vec<usize> = self.samples.iter().map(|s| s.length).collect();
        l.sort_unstable();
        l.dedup();
        l
    }

    /// Checks the file was made with `model`'s tokenizer.
    pub fn check_model(&self, path: &Path, model: &Model) -> Result<()> {
        let vocab = model.llama.config.vocab_size;
        if self.header.vocab_size != vocab {
            return Err(Error::Format {
                path: path.to_path_buf(),
                message: format!(
                    "made for model {} ({} token ids); this model has {vocab}",
                    self.header.model, self.header.vocab_size
                ),
            });
        }
        Ok(())
    }
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Usage(format!("JSON: {e}"))
}

/// Writes `bytes` whole (a temporary file renamed into place), creating the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    Ok(moac::fsutil::write_atomic(path, bytes)?)
}

/// What [`make`] builds.
#[derive(Debug, Clone)]
pub struct CalibOptions {
    /// Length levels N (each sample's prompt takes N - `max_answer` tokens).
    pub lengths: Vec<usize>,
    /// Samples per length.
    pub samples: usize,
    pub seed: u64,
    /// Longest answer (MoA: 128).
    pub max_answer: usize,
    /// Text documents (name, text) summarized in addition to the generated tasks.
    pub sources: Vec<(String, String)>,
    /// Rows answered together.
    pub batch: usize,
}

/// The document families, taken in turn.
const TASKS: [&str; 3] = ["town", "river", "summary"];

/// A document's question, given the indices of the pieces kept whole.
type Question = Box<dyn Fn(&[usize]) -> String>;

/// One document: its pieces (paragraphs or records) and the question about it.
struct Doc {
    task: String,
    pieces: Vec<String>,
    /// The question, given the indices of the pieces kept whole.
    question: Question,
}

const SYLLABLES: [&str; 36] = [
    "ka", "lo", "mir", "an", "te", "sul", "vor", "ni", "da", "ren", "ol", "bri", "cas", "eth",
    "gar", "hol", "is", "jen", "kel", "lum", "mor", "nes", "or", "pil", "quen", "ros", "sar",
    "tov", "ul", "vel", "wyn", "yor", "zan", "fen", "ash", "dru",
];
const TOWN_ENDS: [&str; 10] = [
    "ford", "ton", "wick", "haven", "field", "bury", "mere", "stead", "gate", "holm",
];
const TRADES: [&str; 24] = [
    "rope-making",
    "glassblowing",
    "salt panning",
    "wool weaving",
    "boat building",
    "cheese making",
    "clock making",
    "tin mining",
    "paper milling",
    "bell casting",
    "bee keeping",
    "dyeing cloth",
    "pottery",
    "tanning leather",
    "brewing",
    "printing",
    "shipping timber",
    "fishing",
    "stone cutting",
    "candle making",
    "basket weaving",
    "silver smithing",
    "growing apples",
    "raising horses",
];

fn name(rng: &mut Rng, parts: u64) -> String {
    let mut s = String::new();
    for _ in 0..parts {
        s.push_str(SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize]);
    }
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => s,
    }
}

struct Town {
    name: String,
    river: String,
    mayor: String,
    trade: &'static str,
    founded: u64,
}

fn towns(rng: &mut Rng, count: usize, rivers: &[String]) -> Vec<Town> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let parts = 1 + rng.below(2);
        let end = TOWN_ENDS[rng.below(10) as usize];
        let town = name(rng, parts) + end;
        if !seen.insert(town.clone()) {
            continue;
        }
        out.push(Town {
            name: town,
            river: rivers[rng.below(rivers.len() as u64) as usize].clone(),
            mayor: {
                let first = name(rng, 2);
                let parts = 2 + rng.below(2);
                format!("{first} {}", name(rng, parts))
            },
            trade: TRADES[rng.below(TRADES.len() as u64) as usize],
            founded: 1100 + rng.below(800),
        });
    }
    out
}

fn town_record(i: usize, t: &Town, rng: &mut Rng) -> String {
    let first = match rng.below(3) {
        0 => format!("The town of {} lies on the river {}.", t.name, t.river),
        1 => format!("{} is a town on the banks of the {}.", t.name, t.river),
        _ => format!("On the river {} stands the town of {}.", t.river, t.name),
    };
    let second = match rng.below(3) {
        0 => format!(
            "Its mayor is {}, and most of its people live from {}.",
            t.mayor, t.trade
        ),
        1 => format!(
            "The town is known for {}; {} has been its mayor for years.",
            t.trade, t.mayor
        ),
        _ => format!(
            "{} governs it as mayor. Its main trade is {}.",
            t.mayor, t.trade
        ),
    };
    let third = match rng.below(2) {
        0 => format!("It was founded in {}.", t.founded),
        _ => format!("Its charter dates from the year {}.", t.founded),
    };
    format!("Record {}. {first} {second} {third}\n\n", i + 1)
}

/// A document of `task` with at least `pieces` pieces.
fn document(task: &str, count: usize, rng: &mut Rng, sources: &[(String, String)]) -> Doc {
    let rivers: Vec<String> = (0..6).map(|_| name(rng, 2)).collect();
    match task {
        "source" if !sources.is_empty() => {
            let (src, text) = &sources[rng.below(sources.len() as u64) as usize];
            let paras: Vec<String> = text
                .split("\n\n")
                .filter(|p| !p.trim().is_empty())
                .map(|p| format!("{}\n\n", p.trim()))
                .collect();
            let start = rng.below(paras.len().max(1) as u64) as usize;
            let pieces = (0..count.max(1))
                .map(|i| paras[(start + i) % paras.len().max(1)].clone())
                .collect();
            Doc {
                task: format!("summary:{src}"),
                pieces,
                question: Box::new(|_| {
                    "Now, write a one-page summary of all the text above.\n\nSummary:".into()
                }),
            }
        }
        _ => {
            let ts = towns(rng, count, &rivers);
            let pieces = ts
                .iter()
                .enumerate()
                .map(|(i, t)| town_record(i, t, rng))
                .collect();
            let (task, question): (&str, Question) = match task {
                "river" => {
                    let river = ts.first().map(|t| t.river.clone()).unwrap_or_default();
                    (
                        "river",
                        Box::new(move |_| {
                            format!("Name every town in the records above that lies on the river {river}, with its mayor and its trade.")
                        }),
                    )
                }
                "town" => {
                    let names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
                    let pick = rng.next_u64();
                    (
                        "town",
                        Box::new(move |kept| {
                            let k = kept
                                [(pick % kept.len().max(1) as u64) as usize % kept.len().max(1)];
                            format!("What do the records above say about the town of {}? Give its river, its mayor, its trade and the year it was founded.", names[k])
                        }),
                    )
                }
                _ => (
                    "summary",
                    Box::new(|_| {
                        "Now, write a one-page summary of all the records above.\n\nSummary:".into()
                    }),
                ),
            };
            Doc {
                task: task.into(),
                pieces,
                question,
            }
        }
    }
}

/// The prompt of one sample, exactly `prompt_len` tokens: the chat template's head,
/// the document with its middle dropped to fit, the question and the template's tail.
fn fit_prompt(model: &Model, doc: &Doc, prompt_len: usize) -> Result<Option<Vec<u32>>> {
    let tok = &model.tokenizer;
    let pieces: Vec<Vec<u32>> = doc
        .pieces
        .iter()
        .map(|p| tok.encode(p))
        .collect::<Result<_>>()?;
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let marker = "\u{1}MOAC-DOCUMENT\u{1}";
    // Which pieces survive the cut decides the question; the question's length decides
    // the cut. Fit with the longest question first, then with the real one.
    let render = |question: &str| -> Result<(Vec<u32>, Vec<u32>)> {
        let text = model
            .chat
            .render(&[Message::user(&format!("{marker}{question}"))], true)?;
        let (head, tail) = text.split_once(marker).ok_or_else(|| {
            Error::Template("the chat template dropped the user's message".into())
        })?;
        Ok((tok.encode_prompt(head)?, tok.encode(tail)?))
    };
    let (head, tail) = render(&(doc.question)(&[0]))?;
    let room = prompt_len.saturating_sub(head.len() + tail.len() + 24);
    if total < room {
        return Ok(None);
    }
    // Keep the first and the last room/2 tokens of the document.
    let cut_from = room / 2;
    let cut_to = total - (room - cut_from);
    let mut kept = Vec::new();
    let mut at = 0;
    for (i, p) in pieces.iter().enumerate() {
        if at + p.len() <= cut_from || at >= cut_to {
            kept.push(i);
        }
        at += p.len();
    }
    if kept.is_empty() {
        kept.push(0);
    }
    let (head, tail) = render(&(doc.question)(&kept))?;
    let fixed = head.len() + tail.len();
    if fixed >= prompt_len {
        return Err(Error::TooLong {
            what: "calibration prompt without its document".into(),
            len: fixed,
            max: prompt_len,
        });
    }
    let room = prompt_len - fixed;
    let flat: Vec<u32> = pieces.concat();
    if flat.len() < room {
        return Ok(None);
    }
    let first = room / 2;
    let mut ids = head;
    ids.extend_from_slice(&flat[..first]);
    ids.extend_from_slice(&flat[flat.len() - (room - first)..]);
    ids.extend_from_slice(&tail);
    Ok(Some(ids))
}

/// Makes the calibration set: for each length, `samples` documents (the families in
/// turn), fitted, answered by `engine` (which must be dense) greedily.
/// `progress(done, total)` after each batch.
pub fn make(
    model: &Model,
    engine: Engine<'_>,
    opts: &CalibOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CalibSet> {
    if opts.samples == 0 || opts.lengths.is_empty() {
        return Err(Error::Usage(
            "a calibration set needs at least one length and one sample".into(),
        ));
    }
    let min = opts.max_answer + 256;
    if let Some(&l) = opts.lengths.iter().find(|&&l| l < min) {
        return Err(Error::Usage(format!(
            "length {l} leaves too little room for a document before a {}-token answer (at least {min})",
            opts.max_answer
        )));
    }
    if let Some(&l) = opts
        .lengths
        .iter()
        .find(|&&l| l > model.llama.config.context_len)
    {
        return Err(Error::TooLong {
            what: "calibration length".into(),
            len: l,
            max: model.llama.config.context_len,
        });
    }
    let mut tasks: Vec<&str> = TASKS.to_vec();
    if !opts.sources.is_empty() {
        tasks.push("source");
    }
    let mut rng = Rng::new(opts.seed);
    let total = opts.lengths.len() * opts.samples;
    let mut samples = Vec::with_capacity(total);
    for &length in &opts.lengths {
        let prompt_len = length - opts.max_answer;
        let mut pending: Vec<(String, String, Vec<u32>)> = Vec::new();
        for s in 0..opts.samples {
            let task = tasks[s % tasks.len()];
            // Records take about 50 tokens; grow the document until it fills the room.
            let mut count = prompt_len / 40 + 4;
            let (doc, ids) = loop {
                let doc = document(task, count, &mut rng, &opts.sources);
                if let Some(ids) = fit_prompt(model, &doc, prompt_len)? {
                    break (doc, ids);
                }
                count *= 2;
                if count > 1 << 20 {
                    return Err(Error::Usage(format!(
                        "could not fill a {prompt_len}-token prompt for task {task}"
                    )));
                }
            };
            pending.push((format!("n{length}-{s:03}-{}", doc.task), doc.task, ids));
        }
        for chunk in pending.chunks(opts.batch.max(1)) {
            let prompts: Vec<&[u32]> = chunk.iter().map(|(_, _, p)| p.as_slice()).collect();
            let mut attn = engine.open(prompts.len(), prompt_len, opts.max_answer)?;
            let out = generate(
                &model.llama,
                attn.as_mut(),
                &prompts,
                &GenerateOptions {
                    max_new_tokens: opts.max_answer,
                    sampling: Sampling::default(),
                    stop: model.tokenizer.stop.clone(),
                    top_logprobs: 0,
                },
                &mut |_, _| {},
            )?;
            for ((id, task, prompt), row) in chunk.iter().zip(out.rows) {
                let mut tokens = prompt.clone();
                tokens.extend_from_slice(&row.tokens);
                samples.push(CalibSample {
                    id: id.clone(),
                    length,
                    task: task.clone(),
                    prompt_len: prompt.len(),
                    answer: model.tokenizer.decode(&row.tokens, false)?,
                    tokens,
                });
            }
            progress(samples.len(), total);
        }
    }
    let mut sources = vec![GENERATED_SOURCE.to_string()];
    sources.extend(
        opts.sources
            .iter()
            .map(|(n, _)| format!("{n} (given with --source)")),
    );
    Ok(CalibSet {
        header: CalibHeader {
            format: FORMAT.into(),
            version: 1,
            model: model
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vocab_size: model.llama.config.vocab_size,
            seed: opts.seed,
            max_answer: opts.max_answer,
            sources,
        },
        samples,
    })
}
