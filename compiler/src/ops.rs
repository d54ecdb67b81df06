//! The kernels of the whole-model engine besides attention and the GEMMs: embedding
//! gather, RMSNorm, the q/k/v split with RoPE at per-row positions, SiLU times up,
//! greedy and nucleus sampling, the per-step length advance, and a random fill for
//! benchmark caches. One translation unit per model shape and dtype, rendered from
//! `templates/ops.cu.tera` like the attention kernels, so NVRTC builds it for the GPU
//! and g++ builds the same source for the emu backend. Each kernel's parameters are
//! stated once here ([`Op::params`]); launches are packed against that table.

use crate::abi::{Elem, Param};
use crate::emit::c_double;
use crate::error::{Error, Result};
use crate::geometry::Dtype;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Threads of every op's CTA.
pub const THREADS: u32 = 256;

/// How RoPE pairs the features of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RopePairs {
    /// (2i, 2i+1): GGUF llama weights.
    Interleaved,
    /// (i, i + D/2): Hugging Face's `rotate_half`.
    HalfSplit,
}

/// What the ops of one model are specialized to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpsShape {
    pub dtype: Dtype,
    pub hidden: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub rope: RopePairs,
    pub rms_eps: f32,
}

/// One op of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Embed,
    RmsNorm,
    RopeQkv,
    SiluMul,
    Argmax,
    Sample,
    Advance,
    FillRandom,
}

impl Op {
    pub const ALL: [Op; 8] = [
        Op::Embed,
        Op::RmsNorm,
        Op::RopeQkv,
        Op::SiluMul,
        Op::Argmax,
        Op::Sample,
        Op::Advance,
        Op::FillRandom,
    ];

    /// The kernel's entry point.
    pub fn entry(self) -> &'static str {
        match self {
            Op::Embed => "moac_ops_embed",
            Op::RmsNorm => "moac_ops_rms_norm",
            Op::RopeQkv => "moac_ops_rope_qkv",
            Op::SiluMul => "moac_ops_silu_mul",
            Op::Argmax => "moac_ops_argmax",
            Op::Sample => "moac_ops_sample",
            Op::Advance => "moac_ops_advance",
            Op::FillRandom => "moac_ops_fill_random",
        }
    }

    /// The entry's parameters, in order (the template's signatures follow this table).
    pub fn params(self) -> &'static [(&'static str, Param)] {
        use Elem::{Float, Int, Scalar};
        use Param::*;
        match self {
            Op::Embed => &[
                ("tokens", ConstPtr(Int)),
                ("table", ConstPtr(Scalar)),
                ("x", MutPtr(Float)),
                ("rows", I32),
            ],
            Op::RmsNorm => &[
                ("x", ConstPtr(Float)),
                ("w", ConstPtr(Float)),
                ("row_index", ConstPtr(Int)),
                ("out", MutPtr(Scalar)),
                ("rows", I32),
            ],
            Op::RopeQkv => &[
                ("qkv", ConstPtr(Float)),
                ("positions", ConstPtr(Int)),
                ("pos_offset", I32),
                ("q", MutPtr(Scalar)),
                ("k", MutPtr(Scalar)),
                ("v", MutPtr(Scalar)),
                ("rows", I32),
            ],
            Op::SiluMul => &[
                ("gu", ConstPtr(Float)),
                ("out", MutPtr(Scalar)),
                ("rows", I32),
            ],
            Op::Argmax => &[
                ("logits", ConstPtr(Float)),
                ("tokens", MutPtr(Int)),
                ("rows", I32),
            ],
            Op::Sample => &[
                ("logits", ConstPtr(Float)),
                ("seq_ids", ConstPtr(Int)),
                ("tokens", MutPtr(Int)),
                ("rows", I32),
                ("seed", I64),
                ("step", I32),
                ("temperature", F32),
                ("top_p", F32),
            ],
            Op::Advance => &[("lens", MutPtr(Int)), ("rows", I32)],
            Op::FillRandom => &[
                ("buf", MutPtr(Scalar)),
                ("count", I64),
                ("seed", I64),
                ("scale", F32),
            ],
        }
    }

    /// The launch grid for `rows` rows (`count` elements for the random fill).
    pub fn grid(self, rows: usize) -> (u32, u32, u32) {
        match self {
            Op::Advance => (1, 1, 1),
            Op::FillRandom => (
                (rows.div_ceil(THREADS as usize)).clamp(1, 4096) as u32,
                1,
                1,
            ),
            _ => (rows as u32, 1, 1),
        }
    }

    /// The CTA of every op.
    pub fn block(self) -> (u32, u32, u32) {
        (THREADS, 1, 1)
    }
}

/// The ops' translation unit of one shape: its name (a hash of the source), the source
/// and its entry points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsUnit {
    pub name: String,
    pub source: String,
    pub entries: Vec<&'static str>,
}

impl OpsShape {
    /// Checks what the template assumes.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Template {
                name: "ops.cu.tera".into(),
                message: m,
            })
        };
        if self.hidden == 0 || self.intermediate == 0 || self.vocab == 0 {
            return bad("hidden, intermediate and vocab must be positive".into());
        }
        if self.num_kv_heads == 0 || !self.num_query_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.num_query_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope theta {} must be positive", self.rope_theta));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0) {
            return bad(format!("RMSNorm epsilon {} is not valid", self.rms_eps));
        }
        Ok(())
    }
}

/// Renders the ops of `shape`.
pub fn emit(shape: &OpsShape) -> Result<OpsUnit> {
    shape.check()?;
    let mut ctx = tera::Context::new();
    ctx.insert(
        "scalar",
        match shape.dtype {
            Dtype::F16 => "__half",
            Dtype::Bf16 => "__nv_bfloat16",
        },
    );
    ctx.insert("hidden", &shape.hidden);
    ctx.insert("num_q_heads", &shape.num_query_heads);
    ctx.insert("num_kv_heads", &shape.num_kv_heads);
    ctx.insert("head_dim", &shape.head_dim);
    ctx.insert("intermediate", &shape.intermediate);
    ctx.insert("vocab", &shape.vocab);
    ctx.insert("threads", &THREADS);
    ctx.insert("rope_theta", &c_double(shape.rope_theta));
    ctx.insert("rms_eps", &format!("{:e}", shape.rms_eps));
    ctx.insert(
        "rope_interleaved",
        &u8::from(shape.rope == RopePairs::Interleaved),
    );
    let source = crate::emit::render("ops.cu.tera", "the engine ops", &ctx)?;
    let hash = crate::plan::hex(&sha2::Sha256::digest(source.as_bytes()));
    Ok(OpsUnit {
        name: format!("moac_ops_{}", &hash[..12]),
        source,
        entries: Op::ALL.iter().map(|o| o.entry()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny(dtype: Dtype) -> OpsShape {
        OpsShape {
            dtype,
            hidden: 64,
            num_query_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            intermediate: 96,
            vocab: 300,
            rope_theta: 10000.0,
            rope: RopePairs::HalfSplit,
            rms_eps: 1e-5,
        }
    }

    /// Every op's signature in the source is the table's, in order.
    #[test]
    fn signatures_follow_the_table() {
        let u = emit(&tiny(Dtype::Bf16)).unwrap();
        assert!(u.source.starts_with("// generated by moac"));
        assert!(u.source.contains("typedef __nv_bfloat16 T;"));
        for op in Op::ALL {
            let at = u
                .source
                .find(&format!("\n{}(", op.entry()))
                .unwrap_or_else(|| panic!("{} missing", op.entry()));
            let sig_end = at + u.source[at..].find(')').unwrap();
            let sig = &u.source[at..sig_end];
            let names: Vec<&str> = sig
                .split(',')
                .map(|p| p.trim().rsplit([' ', '*']).next().unwrap())
                .collect();
            let want: Vec<&str> = op.params().iter().map(|(n, _)| *n).collect();
            assert_eq!(names, want, "{}", op.entry());
            for ((_, p), text) in op.params().iter().zip(sig.split(',')) {
                let ty = p.c_type();
                assert!(
                    text.contains(ty.split(' ').next().unwrap()),
                    "{text} vs {ty}"
                );
            }
        }
    }

    #[test]
    fn units_differ_by_shape_and_bad_shapes_fail() {
        let a = emit(&tiny(Dtype::F16)).unwrap();
        let b = emit(&tiny(Dtype::Bf16)).unwrap();
        assert_ne!(a.name, b.name);
        assert_eq!(a, emit(&tiny(Dtype::F16)).unwrap(), "deterministic");
        let mut odd = tiny(Dtype::F16);
        odd.head_dim = 15;
        assert!(emit(&odd).unwrap_err().to_string().contains("head_dim 15"));
        let mut gqa = tiny(Dtype::F16);
        gqa.num_kv_heads = 3;
        assert!(emit(&gqa).is_err());
    }
}
