//! Retrieval heads (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
//! Factuality"): on samples whose answer is copied from the prompt (the calibration's
//! true-answer families), how often each query head's strongest attention, while the
//! model predicts an answer token, lands on that very token inside the needle. A plan
//! that keeps these heads long keeps the model's retrieval; a profile can be checked
//! against them (`moac eval heads`).
//!
//! The needle is found by matching the answer's token n-grams in the prompt (the answer
//! was written into the prompt by the task, so it occurs there; a copy step is an answer
//! token that occurs in a matched stretch).

use crate::llama::Llama;
use crate::{Error, Result};
use candle_core::Tensor;

/// Tokens of the answer matched at once when looking for the needle in the prompt.
const GRAM: usize = 4;

/// Prompt positions (of `tokens[..prompt_len]`) covered by an occurrence of any run of
/// `GRAM` answer tokens (the whole answer when it is shorter), answer = the tokens after
/// the prompt.
pub fn needle_mask(tokens: &[u32], prompt_len: usize) -> Vec<bool> {
    let prompt = &tokens[..prompt_len.min(tokens.len())];
    let answer = &tokens[prompt.len()..];
    let mut mask = vec![false; prompt.len()];
    let n = GRAM.min(answer.len());
    if n == 0 {
        return mask;
    }
    for gram in answer.windows(n) {
        for (i, w) in prompt.windows(n).enumerate() {
            if w == gram {
                mask[i..i + n].iter_mut().for_each(|m| *m = true);
            }
        }
    }
    mask
}

/// The rows r (from the prompt's last on) whose next token `tokens[r + 1]` is an answer
/// token held by a needle position: the copy steps.
pub fn copy_steps(tokens: &[u32], prompt_len: usize, needle: &[bool]) -> Vec<usize> {
    (prompt_len.saturating_sub(1)..tokens.len().saturating_sub(1))
        .filter(|&r| {
            let y = tokens[r + 1];
            needle
                .iter()
                .zip(tokens)
                .any(|(&inside, &t)| inside && t == y)
        })
        .collect()
}

/// One sample's (or a mean of samples') retrieval scores, [layer][query head].
#[derive(Debug, Clone, PartialEq)]
pub struct RetrievalScores {
    /// Samples behind the scores.
    pub samples: usize,
    /// Copy steps (answer tokens found in the needle) behind the scores.
    pub steps: usize,
    /// Share of copy steps at which the head's largest attention weight is on a needle
    /// position holding the token being predicted.
    pub hit: Vec<Vec<f64>>,
    /// Mean attention mass the head puts on the needle at the copy steps.
    pub mass: Vec<Vec<f64>>,
}

impl RetrievalScores {
    /// Zero scores for a model of `layers` x `heads` query heads.
    pub fn zero(layers: usize, heads: usize) -> RetrievalScores {
        RetrievalScores {
            samples: 0,
            steps: 0,
            hit: vec![vec![0.0; heads]; layers],
            mass: vec![vec![0.0; heads]; layers],
        }
    }

    /// Adds another sample's scores so that `self` is the mean over samples (each sample
    /// weighs the same, whatever its number of copy steps).
    pub fn add_sample(&mut self, other: &RetrievalScores) {
        let k = self.samples as f64;
        for (a, b) in self
            .hit
            .iter_mut()
            .flatten()
            .zip(other.hit.iter().flatten())
        {
            *a = (*a * k + b) / (k + 1.0);
        }
        for (a, b) in self
            .mass
            .iter_mut()
            .flatten()
            .zip(other.mass.iter().flatten())
        {
            *a = (*a * k + b) / (k + 1.0);
        }
        self.samples += 1;
        self.steps += other.steps;
    }
}

impl Llama {
    /// The retrieval scores of one sample (prompt, then the answer copied from it), under
    /// dense attention. A sample without any copy step has `steps == 0` and zero scores.
    pub fn retrieval_scores(&self, tokens: &[u32], prompt_len: usize) -> Result<RetrievalScores> {
        let c = &self.config;
        let mut out = RetrievalScores::zero(c.num_layers, c.num_heads);
        let needle = needle_mask(tokens, prompt_len);
        let steps = copy_steps(tokens, prompt_len, &needle);
        out.samples = 1;
        out.steps = steps.len();
        if steps.is_empty() {
            return Ok(out);
        }
        let (inputs, _, _) = self.forward_exact(tokens, None)?;
        let t = tokens.len();
        let positions: Vec<usize> = (0..t).collect();
        let (cos, sin) = self.rope_angles(&positions)?;
        let g = c.num_heads / c.num_kv_heads;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let rows: Vec<u32> = steps.iter().map(|&r| r as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &candle_core::Device::Cpu)?;
        for (li, l) in self.layers.iter().enumerate() {
            let w = crate::llama::Dense::of(l)?;
            let (q, k, _) = self.qkv(l, &w, &inputs[li], &cos, &sin)?;
            for h in 0..c.num_heads {
                let qh = q
                    .narrow(1, h, 1)?
                    .squeeze(1)?
                    .contiguous()?
                    .index_select(&rows, 0)?;
                let kh = k.narrow(1, h / g, 1)?.squeeze(1)?.contiguous()?;
                let scores = qh.matmul(&kh.t()?)?.to_vec2::<f32>()?;
                let (mut hit, mut mass) = (0.0f64, 0.0f64);
                for (row, &r) in scores.iter().zip(&steps) {
                    let y = tokens[r + 1];
                    let row = &row[..=r];
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut sum = 0.0f64;
                    let mut on_needle = 0.0f64;
                    let mut best = 0;
                    for (j, &s) in row.iter().enumerate() {
                        let p = (((s - max) * scale) as f64).exp();
                        sum += p;
                        if j < needle.len() && needle[j] {
                            on_needle += p;
                        }
                        if s > row[best] {
                            best = j;
                        }
                    }
                    mass += on_needle / sum;
                    if best < needle.len() && needle[best] && tokens[best] == y {
                        hit += 1.0;
                    }
                }
                out.hit[li][h] = hit / steps.len() as f64;
                out.mass[li][h] = mass / steps.len() as f64;
            }
        }
        // A hit rate is a ratio of counts; the mass is where a broken model's NaN shows.
        if out.mass.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::Usage(
                "retrieval scores: the attention of a copy step is not finite".into(),
            ));
        }
        Ok(out)
    }
}
