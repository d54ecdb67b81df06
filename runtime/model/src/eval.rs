//! Evaluations: perplexity over windows of a text (scored from the prefill, or with the
//! second half teacher-forced through decode steps), and MoA's retrieval tasks
//! ([`crate::retrieval`]) scored by their last integer.

use crate::attention::Engine;
use crate::generate::log_softmax;
use crate::llama::Llama;
use crate::{Error, Result};
use candle_core::Tensor;

/// How perplexity positions are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PplMode {
    /// Every position of a window from the (sparse) prefill.
    #[default]
    Prefill,
    /// The first half from the prefill, the rest fed token by token through decode steps
    /// (teacher forcing): the decode kernels and the cache are measured too.
    Decode,
}

impl std::str::FromStr for PplMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "prefill" => Ok(PplMode::Prefill),
            "decode" => Ok(PplMode::Decode),
            _ => Err(format!("unknown mode {s:?} (prefill or decode)")),
        }
    }
}

/// The result of [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// Positions scored (each predicts the next token of its window).
    pub tokens: usize,
    pub windows: usize,
    /// Mean negative log-likelihood in nats.
    pub nll: f64,
    pub ppl: f64,
    /// K/V bytes of one window's cache, and of a dense one.
    pub kv_bytes: u64,
    pub dense_kv_bytes: u64,
}

/// Rows of logits computed at once (bounds the [rows, vocab] block).
const LOGIT_CHUNK: usize = 256;

/// Negative log-likelihoods of `targets` given hidden states [T, hidden] (row i predicts
/// targets[i]).
pub(crate) fn nlls(model: &Llama, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(targets.len());
    let mut start = 0;
    while start < targets.len() {
        let n = LOGIT_CHUNK.min(targets.len() - start);
        let logits: Vec<Vec<f32>> = model.logits(&hidden.narrow(0, start, n)?)?.to_vec2()?;
        for (row, &t) in logits.iter().zip(&targets[start..start + n]) {
            out.push(-log_softmax(row)[t as usize]);
        }
        start += n;
    }
    Ok(out)
}

/// What [`perplexity`] scores and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PplOptions {
    /// Tokens per window.
    pub context_len: usize,
    pub mode: PplMode,
    /// Added to N = `context_len` when sizing the cache and the spans.
    pub extra_new_tokens: usize,
    /// Score at most this many windows.
    pub max_windows: Option<usize>,
}

impl PplOptions {
    pub fn new(context_len: usize, mode: PplMode) -> PplOptions {
        PplOptions {
            context_len,
            mode,
            extra_new_tokens: 0,
            max_windows: None,
        }
    }
}

/// Perplexity of `tokens` in non-overlapping windows of `context_len` tokens (at most
/// `max_windows`; a shorter tail is dropped). Each window is its own sequence with a
/// cache sized for N = `context_len` + `extra_new_tokens`. Every position but a window's
/// last is scored, in both modes, so the two modes score the same positions.
/// `progress(done, total)` counts scored positions.
pub fn perplexity(
    model: &Llama,
    engine: Engine<'_>,
    tokens: &[u32],
    opts: &PplOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let PplOptions {
        context_len,
        mode,
        extra_new_tokens,
        max_windows,
    } = *opts;
    if context_len < 2 {
        return Err(Error::Usage(format!(
            "--context-len {context_len}: a window needs at least 2 tokens"
        )));
    }
    if context_len > model.config.context_len {
        return Err(Error::TooLong {
            what: "--context-len".into(),
            len: context_len,
            max: model.config.context_len,
        });
    }
    let mut windows = tokens.len() / context_len;
    if let Some(m) = max_windows {
        windows = windows.min(m);
    }
    if windows == 0 {
        return Err(Error::Usage(format!(
            "the text has {} tokens, fewer than one window of {context_len}",
            tokens.len()
        )));
    }
    let total = windows * (context_len - 1);
    let mut all = Vec::with_capacity(total);
    let (mut kv, mut dense) = (0, 0);
    for w in 0..windows {
        let win = &tokens[w * context_len..(w + 1) * context_len];
        let split = match mode {
            PplMode::Prefill => context_len,
            PplMode::Decode => context_len / 2,
        };
        let mut attn = engine.open(1, split, context_len - split + extra_new_tokens)?;
        let hidden = model.prefill(attn.as_mut(), &[&win[..split]])?.get(0)?;
        let scored = (split).min(context_len - 1);
        all.extend(nlls(
            model,
            &hidden.narrow(0, 0, scored)?,
            &win[1..=scored],
        )?);
        progress(all.len(), total);
        for pos in split..context_len - 1 {
            let h = model.decode(attn.as_mut(), &[win[pos]], &[pos])?;
            all.extend(nlls(model, &h, &[win[pos + 1]])?);
            if pos % 16 == 0 {
                progress(all.len(), total);
            }
        }
        progress(all.len(), total);
        kv = attn.kv_bytes();
        dense = attn.dense_kv_bytes();
    }
    let nll = all.iter().sum::<f64>() / all.len() as f64;
    Ok(Perplexity {
        tokens: all.len(),
        windows,
        nll,
        ppl: nll.exp(),
        kv_bytes: kv,
        dense_kv_bytes: dense,
    })
}

/// The last integer in `text` (digits, commas between digit groups ignored), if any.
pub fn last_integer(text: &str) -> Option<u64> {
    let mut last = None;
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_digit() {
            cur.push(c);
        } else if c == ','
            && !cur.is_empty()
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit())
        {
            continue;
        } else if !cur.is_empty() {
            last = cur.parse().ok().or(last);
            cur.clear();
        }
    }
    if !cur.is_empty() {
        last = cur.parse().ok().or(last);
    }
    last
}
