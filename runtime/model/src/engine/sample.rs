//! Choosing each row's next token on the device, greedy or nucleus ([`DeviceSampling`],
//! [`DeviceEngine::sample`]), and reading the logits back ([`DeviceEngine::logits`]).

use super::{ptr, usage, DeviceEngine, Session};
use crate::Result;
use moac::abi::{Arg, Elem};
use moac::ops::Op;

/// How the next token of each row is chosen on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceSampling {
    Greedy,
    /// Nucleus sampling at `temperature` (> 0) over the smallest set of tokens holding
    /// `top_p` of the probability, with random numbers from `seed`, the sequence and
    /// the step.
    TopP {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

impl DeviceEngine {
    /// Picks every row's next token on the device (into the session's token buffer,
    /// which the next [`DeviceEngine::step`] reads) and returns them.
    pub fn sample(&self, s: &mut Session, how: DeviceSampling) -> Result<Vec<u32>> {
        let g = &self.gpu;
        let rows = s.rows;
        let logits = ptr(g.addr(&s.bufs.logits, 0), Elem::Float);
        let tokens = ptr(g.addr_mut(&mut s.tokens, 0), Elem::Int);
        match how {
            DeviceSampling::Greedy => self.op(
                Op::Argmax,
                rows,
                vec![
                    ("logits", logits),
                    ("tokens", tokens),
                    ("rows", Arg::I32(rows as i32)),
                ],
            )?,
            DeviceSampling::TopP {
                temperature,
                top_p,
                seed,
            } => {
                if !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
                    return Err(usage(format!(
                        "sampling needs a temperature > 0 and top_p in (0, 1]; got {temperature} and {top_p}"
                    )));
                }
                self.op(
                    Op::Sample,
                    rows,
                    vec![
                        ("logits", logits),
                        ("seq_ids", ptr(g.addr(&s.seq_ids_dev, 0), Elem::Int)),
                        ("tokens", tokens),
                        ("rows", Arg::I32(rows as i32)),
                        ("seed", Arg::I64(seed as i64)),
                        ("step", Arg::I32(s.step as i32)),
                        ("temperature", Arg::F32(temperature)),
                        ("top_p", Arg::F32(top_p)),
                    ],
                )?
            }
        }
        let t: Vec<i32> = g.download(&s.tokens, 0, rows)?;
        Ok(t.into_iter().map(|x| x.max(0) as u32).collect())
    }

    /// Every row's logits of the last prefill or step, [rows, V].
    pub fn logits(&self, s: &Session) -> Result<Vec<f32>> {
        Ok(self
            .gpu
            .download(&s.bufs.logits, 0, s.rows * self.config.vocab_size)?)
    }
}
