//! The task families of the calibration mix (`docs/plan-pipeline.md`, section 1).
//!
//! Two lessons shape it. MoA's: long inputs whose answers depend on content far from the
//! question, answered by the model itself ([`Family::Facts`], [`Family::Summary`],
//! [`Family::Town`]). DuoAttention's: synthetic retrieval (a fact placed at a chosen
//! depth of long real text, asked for at the end, with its true answer) singles out the
//! heads that retrieve ([`Family::Kv`], [`Family::Needle`], [`Family::Multi`]).
//!
//! Nothing here is an evaluation task: the evaluation's pass key ("pass key", its
//! grass-and-sky filler) and its LongEval lines ("REGISTER_CONTENT") are never used, and
//! the real text is the one given as a calibration source (by default the World Factbook,
//! `scripts/setup-calib-text.sh`), never the evaluation's prose. A test holds this.

use crate::generate::Rng;

/// One family of calibration tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Key-value lookup in a long list of synthetic records (three record formats).
    Kv,
    /// A number or a name hidden at a depth of real prose, asked for at the end.
    Needle,
    /// Two or three such facts at different depths, all asked for.
    Multi,
    /// A question about one section of real text far from the end (model's answer).
    Facts,
    /// A summary of long real text (MoA's MultiNews instruction; model's answer).
    Summary,
    /// A question about one record of a generated town registry (model's answer).
    Town,
    /// Real text cut at a random place, its own next tokens as the answer: the
    /// language-modelling loss at long range, what perplexity measures (no chat template;
    /// needs real text).
    Prose,
}

/// The default mix, taken in turn within each length.
pub const DEFAULT_MIX: [Family; 6] = [
    Family::Kv,
    Family::Needle,
    Family::Facts,
    Family::Multi,
    Family::Summary,
    Family::Town,
];

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Kv => "kv",
            Family::Needle => "needle",
            Family::Multi => "multi",
            Family::Facts => "facts",
            Family::Summary => "summary",
            Family::Town => "town",
            Family::Prose => "prose",
        }
    }

    /// The family of a calibration sample's task label (`kv-json` -> kv, `source` and
    /// `summary:...` -> summary, `river` -> town); none for a label of no family.
    pub fn of_task(task: &str) -> Option<Family> {
        let head = task.split(['-', ':']).next().unwrap_or(task);
        match head {
            "source" | "summary" => Some(Family::Summary),
            "river" | "town" => Some(Family::Town),
            h => Family::parse(h).ok(),
        }
    }

    /// Families whose reference answer is a retrieval's truth (not the model's own
    /// answer, nor the text's own continuation).
    pub fn synthetic(self) -> bool {
        matches!(self, Family::Kv | Family::Needle | Family::Multi)
    }

    /// Parses one family's name.
    pub fn parse(s: &str) -> Result<Family, String> {
        let all = [
            Family::Kv,
            Family::Needle,
            Family::Multi,
            Family::Facts,
            Family::Summary,
            Family::Town,
            Family::Prose,
        ];
        all.into_iter()
            .find(|f| f.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown calibration family {s:?} (kv, needle, multi, facts, summary, town, prose)"
                )
            })
    }
}

/// Real text split for the families that need it: its paragraphs, and its sections (a
/// heading paragraph `Country: NAME`-style, then the paragraphs up to the next heading).
#[derive(Debug, Clone)]
pub struct Corpus {
    pub name: String,
    pub paragraphs: Vec<String>,
    /// (title, paragraphs) of each headed section.
    pub sections: Vec<(String, Vec<String>)>,
}

impl Corpus {
    /// Splits `text` into paragraphs (blank-line separated) and headed sections.
    pub fn new(name: &str, text: &str) -> Corpus {
        let paragraphs: Vec<String> = text
            .split("\n\n")
            .map(|p| p.trim().replace('\n', " "))
            .filter(|p| !p.is_empty())
            .collect();
        let mut sections: Vec<(String, Vec<String>)> = Vec::new();
        for p in &paragraphs {
            match heading(p) {
                Some(title) => sections.push((title.to_string(), Vec::new())),
                None => {
                    if let Some((_, body)) = sections.last_mut() {
                        body.push(p.clone());
                    }
                }
            }
        }
        sections.retain(|(_, b)| b.len() >= 3);
        Corpus {
            name: name.to_string(),
            paragraphs: paragraphs
                .into_iter()
                .filter(|p| heading(p).is_none())
                .collect(),
            sections,
        }
    }

    /// About `chars` characters of consecutive paragraphs from a random place (wrapping),
    /// skipping any paragraph that mentions `avoid`.
    pub fn run(&self, rng: &mut Rng, chars: usize, avoid: &str) -> Vec<String> {
        let n = self.paragraphs.len().max(1);
        let start = rng.below(n as u64) as usize;
        let mut out = Vec::new();
        let mut got = 0;
        for i in 0..n {
            if got >= chars {
                break;
            }
            let p = &self.paragraphs[(start + i) % n];
            if !avoid.is_empty() && p.contains(avoid) {
                continue;
            }
            got += p.len();
            out.push(format!("{p}\n\n"));
        }
        out
    }
}

/// The title of a heading paragraph: one short line `Word: Title`.
fn heading(p: &str) -> Option<&str> {
    let (key, title) = p.split_once(": ")?;
    (p.len() < 80 && !key.contains(' ') && !title.is_empty()).then_some(title.trim())
}

/// One task before fitting: an introduction, a haystack of pieces, facts placed at depths
/// of it, the question, and the true answer (none: the dense model answers).
#[derive(Debug, Clone)]
pub struct Spec {
    pub family: Family,
    /// A name for the sample id (the family and its template).
    pub label: String,
    pub intro: String,
    /// The haystack, in order.
    pub pieces: Vec<String>,
    /// Keep whole pieces only (records); else the haystack is cut to the token.
    pub whole_pieces: bool,
    /// (depth in [0, 1] of the haystack, text) of each placed fact, by depth.
    pub inserts: Vec<(f64, String)>,
    pub question: String,
    pub truth: Option<String>,
}

const SUBJECTS: [&str; 14] = [
    "the lighthouse keeper",
    "the museum curator",
    "the ship's captain",
    "the village baker",
    "the head librarian",
    "the old clockmaker",
    "the river pilot",
    "the mountain guide",
    "the court astronomer",
    "the harbour master",
    "the orchard owner",
    "the railway signalman",
    "the glass painter",
    "the chief beekeeper",
];

const SYLLABLES: [&str; 24] = [
    "bar", "cel", "dor", "fin", "gal", "hen", "ira", "jul", "kor", "lan", "mel", "nor", "ost",
    "pra", "quil", "ros", "sel", "tam", "urb", "vin", "wen", "xan", "yel", "zor",
];

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn made_name(rng: &mut Rng) -> String {
    let parts = 2 + rng.below(2);
    let s: String = (0..parts)
        .map(|_| SYLLABLES[rng.below(SYLLABLES.len() as u64) as usize])
        .collect();
    capitalized(&s)
}

/// One hidden fact: (sentence placed in the text, question, true answer).
fn fact(rng: &mut Rng, subject: &str) -> (String, String, String) {
    let s = subject;
    let cs = capitalized(s);
    match rng.below(6) {
        0 => {
            let v = 10_000 + rng.below(90_000);
            (
                format!("The secret number of {s} is {v}."),
                format!("What is the secret number of {s}?"),
                format!("The secret number of {s} is {v}."),
            )
        }
        1 => {
            let v = 1000 + rng.below(9000);
            (
                format!("{cs} keeps the vault locked with the code {v}."),
                format!("Which code does {s} use to lock the vault?"),
                format!("{cs} locks the vault with the code {v}."),
            )
        }
        2 => {
            let v = 1500 + rng.below(500);
            (
                format!("A note in the archive says that {s} was born in the year {v}."),
                format!("In which year was {s} born, according to the note in the archive?"),
                format!("{cs} was born in the year {v}."),
            )
        }
        3 => {
            let n = made_name(rng);
            (
                format!("The favourite horse of {s} is called {n}."),
                format!("What is the name of the favourite horse of {s}?"),
                format!("The favourite horse of {s} is called {n}."),
            )
        }
        4 => {
            let n = made_name(rng);
            (
                format!("{cs} named the new boat {n}."),
                format!("What name did {s} give the new boat?"),
                format!("{cs} named the new boat {n}."),
            )
        }
        _ => {
            let (a, b) = (made_name(rng), 100 + rng.below(900));
            (
                format!("The password that {s} chose is {a}{b}."),
                format!("Which password did {s} choose?"),
                format!("The password {s} chose is {a}{b}."),
            )
        }
    }
}

/// Distinct subjects, `n` of them.
fn subjects(rng: &mut Rng, n: usize) -> Vec<&'static str> {
    let mut all: Vec<&'static str> = SUBJECTS.to_vec();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    all.truncate(n);
    all
}

/// Filler prose: the corpus when there is one, else generated records.
fn prose(
    corpus: Option<&Corpus>,
    rng: &mut Rng,
    chars: usize,
    filler: &dyn Fn(&mut Rng, usize) -> Vec<String>,
) -> Vec<String> {
    match corpus {
        Some(c) if !c.paragraphs.is_empty() => c.run(rng, chars, ""),
        _ => filler(rng, chars),
    }
}

fn hex(rng: &mut Rng, digits: usize) -> String {
    let v = rng.next_u64();
    format!("{v:016x}")[..digits].to_string()
}

/// Builds one task of `family` for a prompt of about `chars` characters of haystack.
/// `depth` places the (first) fact; `filler` makes generated prose when there is no
/// corpus. Returns none when the family needs real text that is not there.
pub fn spec(
    family: Family,
    corpus: Option<&Corpus>,
    rng: &mut Rng,
    chars: usize,
    depth: f64,
    filler: &dyn Fn(&mut Rng, usize) -> Vec<String>,
) -> Option<Spec> {
    let depth = depth.clamp(0.0, 1.0);
    match family {
        Family::Kv => {
            let template = rng.below(3);
            let mut seen = std::collections::HashSet::new();
            let mut pieces = Vec::new();
            let mut got = 0;
            let mut key = |rng: &mut Rng| loop {
                let k = match template {
                    0 => hex(rng, 8),
                    1 => format!(
                        "{}{}-{}",
                        (b'A' + rng.below(26) as u8) as char,
                        (b'A' + rng.below(26) as u8) as char,
                        1000 + rng.below(9000)
                    ),
                    _ => format!(
                        "{}{}-{}",
                        (b'K' + rng.below(16) as u8) as char,
                        (b'P' + rng.below(10) as u8) as char,
                        100 + rng.below(9900)
                    ),
                };
                if seen.insert(k.clone()) {
                    break k;
                }
            };
            let entry = |k: &str, v: &str| match template {
                0 => format!("  \"{k}\": \"{v}\",\n"),
                1 => format!("badge {k}: locker {v}\n"),
                _ => format!("Shipment {k} weighs {v} grams.\n"),
            };
            let value = |rng: &mut Rng| match template {
                0 => hex(rng, 8),
                _ => (1000 + rng.below(90_000)).to_string(),
            };
            let target = key(rng);
            let target_value = value(rng);
            while got < chars {
                let k = key(rng);
                let v = value(rng);
                let e = entry(&k, &v);
                got += e.len();
                pieces.push(e);
            }
            let (intro, question, truth, label) = match template {
                0 => (
                    "Here is a JSON object of keys and values.\n\n{".to_string(),
                    format!("}}\n\nWhat is the value for the key \"{target}\" in the JSON object above?"),
                    format!("The value for the key \"{target}\" is \"{target_value}\"."),
                    "kv-json",
                ),
                1 => (
                    "The staff list below gives every badge its locker.\n".to_string(),
                    format!("Which locker belongs to badge {target}?"),
                    format!("Badge {target} belongs to locker {target_value}."),
                    "kv-badge",
                ),
                _ => (
                    "The warehouse log below lists shipments and their weights.\n".to_string(),
                    format!("How much does shipment {target} weigh?"),
                    format!("Shipment {target} weighs {target_value} grams."),
                    "kv-shipment",
                ),
            };
            Some(Spec {
                family,
                label: label.into(),
                intro,
                pieces,
                whole_pieces: true,
                inserts: vec![(depth, entry(&target, &target_value))],
                question,
                truth: Some(truth),
            })
        }
        Family::Needle | Family::Multi => {
            let n = if family == Family::Needle {
                1
            } else {
                2 + rng.below(2) as usize
            };
            let who = subjects(rng, n);
            let mut facts: Vec<(f64, (String, String, String))> = who
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let d = if i == 0 {
                        depth
                    } else {
                        0.05 + 0.9 * rng.next_f64()
                    };
                    (d, fact(rng, s))
                })
                .collect();
            facts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let pieces = prose(corpus, rng, chars, filler);
            let (question, truth) = if n == 1 {
                let (_, (_, q, a)) = &facts[0];
                (q.clone(), a.clone())
            } else {
                // Asked in another order than they appear.
                let mut order: Vec<usize> = (0..n).collect();
                order.rotate_left(1 + rng.below(n as u64 - 1) as usize);
                let q: Vec<String> = order
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| format!("{}. {}", i + 1, facts[k].1 .1))
                    .collect();
                let a: Vec<String> = order
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| format!("{}. {}", i + 1, facts[k].1 .2))
                    .collect();
                (
                    format!("Answer each question:\n{}", q.join("\n")),
                    a.join("\n"),
                )
            };
            Some(Spec {
                family,
                label: family.name().into(),
                intro: "Read the following text carefully; some details in it will be asked about at the end.".into(),
                pieces,
                whole_pieces: false,
                inserts: facts
                    .into_iter()
                    .map(|(d, (sentence, _, _))| (d, format!("{sentence}\n\n")))
                    .collect(),
                question,
                truth: Some(truth),
            })
        }
        Family::Facts => {
            let c = corpus?;
            if !c.sections.is_empty() {
                let (title, body) = &c.sections[rng.below(c.sections.len() as u64) as usize];
                // Four paragraphs of the section after its first (a long background):
                // where it is, its climate, terrain and capital in the Factbook's order,
                // placed early, far from the end.
                let block: String = body
                    .iter()
                    .skip(1)
                    .take(4)
                    .map(|p| format!("{p}\n\n"))
                    .collect();
                Some(Spec {
                    family,
                    label: "facts-section".into(),
                    intro: "Read the following country profiles.".into(),
                    pieces: c.run(rng, chars, title),
                    whole_pieces: false,
                    inserts: vec![(0.05 + 0.5 * depth, block)],
                    question: format!(
                        "According to the profiles above, where is {title}, what is its climate like, and what is its capital? Answer in a few sentences."
                    ),
                    truth: None,
                })
            } else {
                let pieces = c.run(rng, chars, "");
                let words: Vec<&str> = pieces.first()?.split_whitespace().take(8).collect();
                let at = pieces.first()?.clone();
                let rest = pieces[1..].to_vec();
                Some(Spec {
                    family,
                    label: "facts-paragraph".into(),
                    intro: "Read the following text.".into(),
                    pieces: rest,
                    whole_pieces: false,
                    inserts: vec![(0.05 + 0.5 * depth, at)],
                    question: format!(
                        "The text above contains a paragraph that begins with \"{}\". What does that paragraph say? Answer briefly.",
                        words.join(" ")
                    ),
                    truth: None,
                })
            }
        }
        // Summary and Town are fitted by the calibration's middle-cut documents, Prose
        // by cutting real text (`calib::fit_prose`).
        Family::Summary | Family::Town | Family::Prose => None,
    }
}
