//! Validation: the response loss of calibration-style samples under a plan, computed as
//! the plan runs: the prompt prefilled through moac's cache, the answer decoded token by
//! token with its true tokens fed back (teacher forcing). MoA picks, among the Pareto
//! plans, the one with the lowest loss at a length longer than any profiled (moac keeps
//! the optimizer's choice unless another plan is better beyond the held-out noise).

use super::calib::CalibSample;
use crate::attention::Engine;
use crate::eval::nlls;
use crate::generate::log_softmax;
use crate::llama::Llama;
use crate::{Error, Result};

/// Each sample's mean cross-entropy over its answer tokens, through `engine` with a cache
/// sized for N = the longest prompt + `max_answer`. Samples run `batch` at a time.
pub fn response_losses(
    llama: &Llama,
    engine: Engine<'_>,
    samples: &[&CalibSample],
    max_answer: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    if samples.is_empty() {
        return Err(Error::Usage("no samples to validate with".into()));
    }
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(batch.max(1)) {
        let prompts: Vec<&[u32]> = chunk.iter().map(|s| &s.tokens[..s.prompt_len]).collect();
        let answers: Vec<&[u32]> = chunk.iter().map(|s| &s.tokens[s.prompt_len..]).collect();
        let longest = answers.iter().map(|a| a.len()).max().unwrap_or(0);
        if longest > max_answer {
            return Err(Error::Usage(format!(
                "an answer of {longest} tokens is longer than the {max_answer} the cache is sized for"
            )));
        }
        let p = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut attn = engine.open(chunk.len(), p, max_answer)?;
        let hidden = llama.prefill(attn.as_mut(), &prompts)?;
        let mut sums = vec![0.0f64; chunk.len()];
        for (r, (prompt, answer)) in prompts.iter().zip(&answers).enumerate() {
            let h = hidden.get(r)?.narrow(0, prompt.len() - 1, 1)?;
            sums[r] += nlls(llama, &h, &answer[..1])?[0];
        }
        for step in 1..longest {
            // Row r feeds its answer's token step-1 at position prompt + step - 1; rows
            // whose answer is over feed a placeholder and are not scored.
            let tokens: Vec<u32> = answers
                .iter()
                .map(|a| a.get(step - 1).copied().unwrap_or(0))
                .collect();
            let positions: Vec<usize> = prompts.iter().map(|p| p.len() + step - 1).collect();
            let h = llama.decode(attn.as_mut(), &tokens, &positions)?;
            // One LM-head product for the whole batch per step.
            let logits: Vec<Vec<f32>> = llama.logits(&h)?.to_vec2()?;
            for ((sum, answer), row) in sums.iter_mut().zip(&answers).zip(&logits) {
                if let Some(&target) = answer.get(step) {
                    *sum -= log_softmax(row)[target as usize];
                }
            }
        }
        for (s, a) in sums.iter().zip(&answers) {
            out.push(s / a.len() as f64);
        }
        progress(out.len(), samples.len());
    }
    Ok(out)
}
