//! Text generation over a batch of prompts: one prefill, then decode steps on the
//! cache, each row sampled on its own (greedy at temperature 0, else temperature and
//! nucleus (top-p) sampling from a seeded generator, one stream per row so a row's
//! tokens do not depend on the batch around it), stopping at the model's stop ids.

use crate::attention::Attention;
use crate::llama::Llama;
use crate::Result;
use candle_core::Tensor;
use std::time::Instant;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy (the most likely id).
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely ids up to this much probability.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Options of [`generate`].
#[derive(Debug, Clone, Default)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Ids that end a row (included in its tokens).
    pub stop: Vec<u32>,
    /// Report the K most likely ids and their log-probabilities at every step.
    pub top_logprobs: usize,
}

/// One row's result.
#[derive(Debug, Clone, Default)]
pub struct RowOutput {
    pub tokens: Vec<u32>,
    /// Per generated step, the K most likely (id, log-probability), most likely first.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Ended by a stop id (else by the token limit).
    pub stopped: bool,
}

/// The result of [`generate`].
#[derive(Debug, Clone, Default)]
pub struct GenerateOutput {
    pub rows: Vec<RowOutput>,
    /// Seconds of the prefill (through the first token's logits).
    pub prefill_s: f64,
    /// Seconds of the decode steps.
    pub decode_s: f64,
    /// Decode steps run (each advances every row by one token).
    pub decode_steps: usize,
}

impl GenerateOutput {
    /// Generated tokens per second of decoding, over the batch.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            (self.decode_steps * self.rows.len()) as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// The seeded generator of sampling and of the retrieval tasks: the runtime's one
/// Rng64 (reproducible streams, not cryptographic ones).
pub use moac_runtime::reference::check::Rng;

/// Log-softmax of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// The `k` most likely ids of `logits` with their log-probabilities.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lp = log_softmax(logits);
    let mut order: Vec<usize> = (0..lp.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    order.select_nth_unstable_by(k - 1, |&a, &b| lp[b].total_cmp(&lp[a]));
    order.truncate(k);
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .map(|i| (i as u32, lp[i] as f32))
        .collect()
}

/// The greedy choice: the most likely id (the lowest id among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Chooses the next id from one row of logits.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let t = s.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top_p = (s.top_p as f64).clamp(0.0, 1.0);
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1 / total;
        if mass >= top_p {
            break;
        }
    }
    let kept = &probs[..kept.max(1)];
    let sum: f64 = kept.iter().map(|p| p.1).sum();
    let mut u = rng.next_f64() * sum;
    for p in kept {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    kept[kept.len() - 1].0
}

/// Generates up to `max_new_tokens` ids after each prompt. `attn` must be fresh and
/// sized for N = the longest prompt + `max_new_tokens`. `on_token(row, id)` sees every
/// id as it is chosen (for streaming).
pub fn generate(
    model: &Llama,
    attn: &mut dyn Attention,
    prompts: &[&[u32]],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<GenerateOutput> {
    let b = prompts.len();
    let mut rngs: Vec<Rng> = (0..b)
        .map(|r| Rng::new(opts.sampling.seed ^ (r as u64).wrapping_mul(0x9e37_79b9)))
        .collect();
    let mut out = GenerateOutput {
        rows: vec![RowOutput::default(); b],
        ..GenerateOutput::default()
    };
    if opts.max_new_tokens == 0 {
        return Ok(out);
    }
    let start = Instant::now();
    let hidden = model.prefill(attn, prompts)?;
    let last: Vec<Tensor> = prompts
        .iter()
        .enumerate()
        .map(|(r, p)| hidden.get(r)?.get(p.len() - 1))
        .collect::<candle_core::Result<_>>()?;
    let mut logits = model.logits(&Tensor::stack(&last, 0)?)?;
    let mut step = 0;
    let mut decode_start = None;
    loop {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter().enumerate() {
            let o = &mut out.rows[r];
            if o.stopped {
                // Finished rows keep a place in the batch; their tokens are not kept.
                next.push(o.tokens.last().copied().unwrap_or(0));
                continue;
            }
            let id = sample(row, &opts.sampling, &mut rngs[r]);
            if opts.top_logprobs > 0 {
                o.top_logprobs.push(top_logprobs(row, opts.top_logprobs));
            }
            o.tokens.push(id);
            o.stopped = opts.stop.contains(&id);
            on_token(r, id);
            next.push(id);
        }
        if step == 0 {
            out.prefill_s = start.elapsed().as_secs_f64();
            decode_start = Some(Instant::now());
        }
        step += 1;
        if step >= opts.max_new_tokens || out.rows.iter().all(|o| o.stopped) {
            break;
        }
        let positions: Vec<usize> = prompts.iter().map(|p| p.len() + step - 1).collect();
        let h = model.decode(attn, &next, &positions)?;
        logits = model.logits(&h)?;
        out.decode_steps += 1;
    }
    out.decode_s = decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(out)
}
