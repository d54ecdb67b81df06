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

use super::tasks::{self, Corpus, Family, Spec};
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
    /// The answer is the task's true answer (synthetic retrieval), not the dense
    /// model's own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truth: bool,
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

/// Where `scripts/setup-calib-text.sh` puts the default calibration text, for a model at
/// `model` (a file in, or a folder under, the project's `models/`): `models/text/factbook.txt`.
pub fn default_source(model: &Path) -> std::path::PathBuf {
    let dir = model.parent().unwrap_or(Path::new("."));
    dir.join("text").join("factbook.txt")
}

/// Reads a calibration text: UTF-8 with paragraphs (blank-line separated). Its name in
/// the calibration header is the path, with the first line of `<path>.provenance` when
/// there is one (where it came from, its license).
pub fn read_source(path: &Path) -> Result<(String, String)> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        message: format!(
            "calibration text is not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ),
    })?;
    if text.split("\n\n").all(|s| s.trim().is_empty()) {
        return Err(Error::Format {
            path: path.to_path_buf(),
            message: "calibration text has no paragraphs".into(),
        });
    }
    let mut prov = path.as_os_str().to_owned();
    prov.push(".provenance");
    let name = match std::fs::read_to_string(&prov) {
        Ok(p) => format!(
            "{} ({})",
            path.display(),
            p.split("\n\n")
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(_) => path.display().to_string(),
    };
    Ok((name, text))
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
    /// Samples at each length, in the order of `lengths` (empty: `samples` at each).
    pub samples_at: Vec<usize>,
    pub seed: u64,
    /// Longest answer (MoA: 128).
    pub max_answer: usize,
    /// Real text documents (name, text): the haystack of the retrieval families, the
    /// sections the fact questions ask about, the text summarized.
    pub sources: Vec<(String, String)>,
    /// The task families, taken in turn within each length ([`tasks::DEFAULT_MIX`]).
    pub families: Vec<Family>,
    /// Rows answered together.
    pub batch: usize,
}

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
            // The file's name (the header has the whole provenance).
            let short = src.split(" (").next().unwrap_or(src);
            let short = Path::new(short)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| short.to_string());
            Doc {
                task: format!("summary:{short}"),
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

/// The ids of one user turn in the model's chat template (with the generation prompt)
/// around a document still to be placed: (template head + `before`, `after` + template
/// tail).
fn chat_around(model: &Model, before: &str, after: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let marker = "\u{1}MOAC-DOCUMENT\u{1}";
    let text = model
        .chat
        .render(&[Message::user(&format!("{before}{marker}{after}"))], true)?;
    let (head, tail) = text
        .split_once(marker)
        .ok_or_else(|| Error::Template("the chat template dropped the user's message".into()))?;
    let tok = &model.tokenizer;
    Ok((tok.encode_prompt(head)?, tok.encode(tail)?))
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
    // Which pieces survive the cut decides the question; the question's length decides
    // the cut. Fit with the longest question first, then with the real one.
    let render = |question: &str| chat_around(model, "", question);
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

/// The prompt of a [`Spec`], at most `prompt_len` tokens (exactly, unless the haystack
/// keeps whole pieces): the chat template's head, the introduction, the haystack cut to
/// fit with each fact placed at its depth (on a piece boundary), the question and the
/// template's tail. None when the haystack is too short.
fn fit_spec(model: &Model, spec: &Spec, prompt_len: usize) -> Result<Option<Vec<u32>>> {
    let tok = &model.tokenizer;
    let (head, tail) = chat_around(
        model,
        &format!("{}\n\n", spec.intro),
        &format!("\n\n{}", spec.question),
    )?;
    let inserts: Vec<(f64, Vec<u32>)> = spec
        .inserts
        .iter()
        .map(|(d, t)| Ok((*d, tok.encode(t)?)))
        .collect::<Result<_>>()?;
    let fixed = head.len() + tail.len() + inserts.iter().map(|(_, t)| t.len()).sum::<usize>();
    if fixed + 64 > prompt_len {
        return Err(Error::TooLong {
            what: format!("calibration prompt ({}) without its haystack", spec.label),
            len: fixed + 64,
            max: prompt_len,
        });
    }
    let room = prompt_len - fixed;
    let mut hay: Vec<u32> = Vec::with_capacity(room + 256);
    let mut bounds = vec![0usize];
    for p in &spec.pieces {
        let ids = tok.encode(p)?;
        if spec.whole_pieces && hay.len() + ids.len() > room {
            break;
        }
        hay.extend_from_slice(&ids);
        bounds.push(hay.len().min(room));
        if hay.len() >= room {
            break;
        }
    }
    if hay.len() < room && !(spec.whole_pieces && hay.len() + 64 >= room) {
        return Ok(None);
    }
    hay.truncate(room);
    bounds.retain(|&b| b <= hay.len());
    let mut ids = head;
    let mut at = 0;
    for (d, t) in &inserts {
        let want = (d * hay.len() as f64).round() as usize;
        let cut = bounds
            .iter()
            .copied()
            .filter(|&b| b >= at)
            .min_by_key(|&b| b.abs_diff(want))
            .unwrap_or(at);
        ids.extend_from_slice(&hay[at..cut]);
        ids.extend_from_slice(t);
        at = cut;
    }
    ids.extend_from_slice(&hay[at..]);
    ids.extend_from_slice(&tail);
    Ok(Some(ids))
}

/// One sample before answering: id, task label, prompt ids, true answer ids (None: the
/// dense model answers).
pub struct Pending {
    pub id: String,
    pub task: String,
    pub prompt: Vec<u32>,
    pub truth: Option<Vec<u32>>,
}

/// A [`Family::Prose`] sample from about `chars` characters of `corpus` from a random
/// place: the text's first `prompt_len` ids (as the model reads plain text: no chat
/// template) and its next `answer` ids. None when the run is too short.
fn fit_prose(
    model: &Model,
    corpus: &Corpus,
    rng: &mut Rng,
    chars: usize,
    prompt_len: usize,
    answer: usize,
) -> Result<Option<(Vec<u32>, Vec<u32>)>> {
    let text: String = corpus.run(rng, chars, "").concat();
    let ids = model.tokenizer.encode(&text)?;
    if ids.len() < prompt_len + answer {
        return Ok(None);
    }
    Ok(Some((
        ids[..prompt_len].to_vec(),
        ids[prompt_len..prompt_len + answer].to_vec(),
    )))
}

/// Generated records as filler prose (when no real text is given).
fn town_filler(rng: &mut Rng, chars: usize) -> Vec<String> {
    let rivers: Vec<String> = (0..6).map(|_| name(rng, 2)).collect();
    let count = chars / 150 + 4;
    let ts = towns(rng, count, &rivers);
    ts.iter()
        .enumerate()
        .map(|(i, t)| town_record(i, t, rng))
        .collect()
}

impl CalibOptions {
    /// Samples at the `i`-th length.
    pub fn count(&self, i: usize) -> usize {
        self.samples_at.get(i).copied().unwrap_or(self.samples)
    }

    /// Samples in all.
    pub fn total(&self) -> usize {
        (0..self.lengths.len()).map(|i| self.count(i)).sum()
    }
}

/// Checks the options against the model (lengths, families, sample count).
pub fn check_options(model: &Model, opts: &CalibOptions) -> Result<()> {
    if !opts.samples_at.is_empty() && opts.samples_at.len() != opts.lengths.len() {
        return Err(Error::Usage(format!(
            "{} sample counts for {} lengths (give one count, or one per length)",
            opts.samples_at.len(),
            opts.lengths.len()
        )));
    }
    if opts.lengths.is_empty() || (0..opts.lengths.len()).any(|i| opts.count(i) == 0) {
        return Err(Error::Usage(
            "a calibration set needs at least one length and one sample".into(),
        ));
    }
    if opts.families.is_empty() {
        return Err(Error::Usage(
            "a calibration set needs at least one task family".into(),
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
    Ok(())
}

/// The header's `sources`: where the text came from and which families were made.
pub fn header_sources(opts: &CalibOptions) -> Vec<String> {
    let mut sources = vec![GENERATED_SOURCE.to_string()];
    sources.extend(opts.sources.iter().map(|(n, _)| n.clone()));
    sources.push(format!(
        "families: {}",
        opts.families
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(",")
    ));
    sources
}

/// The samples' prompts (and true answers where the family has one), deterministic for
/// the seed: for each length, `samples` tasks of the families in turn, each family's
/// facts at depths spread over the input.
pub fn prompts(model: &Model, opts: &CalibOptions) -> Result<Vec<(usize, Pending)>> {
    check_options(model, opts)?;
    let corpora: Vec<Corpus> = opts
        .sources
        .iter()
        .map(|(n, t)| Corpus::new(n, t))
        .filter(|c| !c.paragraphs.is_empty())
        .collect();
    // A text repeated to fill a prompt would teach copying, not retrieval: each source
    // must hold the longest prompt (about 4 characters a token, with room to spare).
    let longest = opts.lengths.iter().max().copied().unwrap_or(0) - opts.max_answer;
    for (c, (n, t)) in corpora.iter().zip(&opts.sources) {
        let have: usize = c.paragraphs.iter().map(|p| p.len()).sum();
        if have < 6 * longest {
            return Err(Error::Usage(format!(
                "calibration text {n}: {have} characters of paragraphs ({} in all), too short for a {longest}-token prompt (needs about {})",
                t.len(),
                6 * longest
            )));
        }
    }
    let mut rng = Rng::new(opts.seed);
    let mut out = Vec::new();
    let stop = model.tokenizer.stop.first().copied();
    for (li, &length) in opts.lengths.iter().enumerate() {
        let prompt_len = length - opts.max_answer;
        let nf = opts.families.len();
        let count = opts.count(li);
        for s in 0..count {
            let family = opts.families[s % nf];
            // The k-th of `per` samples of this family at this length: its depth is drawn
            // in the k-th of `per` equal slices of (0.02, 0.98).
            let (k, per) = (s / nf, count.div_ceil(nf).max(1));
            let depth = 0.02 + 0.96 * (k as f64 + rng.next_f64()) / per as f64;
            let corpus =
                (!corpora.is_empty()).then(|| &corpora[rng.below(corpora.len() as u64) as usize]);
            let mut chars = prompt_len * 6 + 2048;
            let mut made = None;
            if let (Family::Prose, Some(c)) = (family, corpus) {
                for _ in 0..6 {
                    if let Some((ids, answer)) =
                        fit_prose(model, c, &mut rng, chars, prompt_len, opts.max_answer)?
                    {
                        made = Some(("prose".to_string(), ids, Some(answer)));
                        break;
                    }
                    chars *= 2;
                }
            }
            for _ in 0..6 {
                if made.is_some() {
                    break;
                }
                let Some(spec) = tasks::spec(family, corpus, &mut rng, chars, depth, &town_filler)
                else {
                    break;
                };
                if let Some(ids) = fit_spec(model, &spec, prompt_len)? {
                    let truth = match &spec.truth {
                        Some(t) => {
                            let mut a = model.tokenizer.encode(t)?;
                            a.extend(stop);
                            if a.len() > opts.max_answer {
                                return Err(Error::Usage(format!(
                                    "a {} answer takes {} tokens, more than --max-answer {}",
                                    spec.label,
                                    a.len(),
                                    opts.max_answer
                                )));
                            }
                            Some(a)
                        }
                        None => None,
                    };
                    made = Some((spec.label.clone(), ids, truth));
                    break;
                }
                chars *= 2;
            }
            let (task, ids, truth) = match made {
                Some(m) => m,
                None => {
                    // Documents fitted by cutting their middle: a summary (of real text
                    // when there is some) or a question about a town's record.
                    let task = match family {
                        Family::Summary if corpus.is_some() => "source",
                        Family::Summary => "summary",
                        _ if k % 2 == 0 => "town",
                        _ => "river",
                    };
                    let sources: Vec<(String, String)> = match corpus {
                        Some(c) if task == "source" => opts
                            .sources
                            .iter()
                            .filter(|(n, _)| *n == c.name)
                            .cloned()
                            .collect(),
                        _ => Vec::new(),
                    };
                    // Records take about 50 tokens; grow the document until it fills.
                    let mut count = prompt_len / 40 + 4;
                    let (doc, ids) = loop {
                        let doc = document(task, count, &mut rng, &sources);
                        if let Some(ids) = fit_prompt(model, &doc, prompt_len)? {
                            break (doc, ids);
                        }
                        count *= 2;
                        if count > 1 << 20 {
                            return Err(Error::Usage(format!(
                                "could not fill a {prompt_len}-token prompt for task {task} (is the source text long enough?)"
                            )));
                        }
                    };
                    (doc.task, ids, None)
                }
            };
            out.push((
                length,
                Pending {
                    id: format!("n{length}-{s:03}-{task}"),
                    task,
                    prompt: ids,
                    truth,
                },
            ));
        }
    }
    Ok(out)
}

/// Makes the calibration set: [`prompts`], then the families without a true answer
/// answered by `engine` (which must be dense) greedily, `batch` rows at a time.
/// `progress(done, total)` after each batch.
pub fn make(
    model: &Model,
    engine: Engine<'_>,
    opts: &CalibOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CalibSet> {
    let pending = prompts(model, opts)?;
    let total = pending.len();
    let mut samples: Vec<Option<CalibSample>> = vec![None; total];
    let mut done = 0;
    for (i, (length, p)) in pending.iter().enumerate() {
        if let Some(a) = &p.truth {
            let mut tokens = p.prompt.clone();
            tokens.extend_from_slice(a);
            samples[i] = Some(CalibSample {
                id: p.id.clone(),
                length: *length,
                task: p.task.clone(),
                prompt_len: p.prompt.len(),
                answer: model.tokenizer.decode(a, false)?,
                tokens,
                truth: true,
            });
            done += 1;
        }
    }
    progress(done, total);
    let open: Vec<usize> = (0..total).filter(|&i| samples[i].is_none()).collect();
    for &length in &opts.lengths {
        let mine: Vec<usize> = open
            .iter()
            .copied()
            .filter(|&i| pending[i].0 == length)
            .collect();
        for chunk in mine.chunks(opts.batch.max(1)) {
            let prompts: Vec<&[u32]> = chunk
                .iter()
                .map(|&i| pending[i].1.prompt.as_slice())
                .collect();
            let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
            let mut attn = engine.open(prompts.len(), longest, opts.max_answer)?;
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
            for (&i, row) in chunk.iter().zip(out.rows) {
                let p = &pending[i].1;
                let mut tokens = p.prompt.clone();
                tokens.extend_from_slice(&row.tokens);
                samples[i] = Some(CalibSample {
                    id: p.id.clone(),
                    length,
                    task: p.task.clone(),
                    prompt_len: p.prompt.len(),
                    answer: model.tokenizer.decode(&row.tokens, false)?,
                    tokens,
                    truth: false,
                });
                done += 1;
            }
            progress(done, total);
        }
    }
    let samples: Vec<CalibSample> = samples.into_iter().flatten().collect();
    let sources = header_sources(opts);
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
