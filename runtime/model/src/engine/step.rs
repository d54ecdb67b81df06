//! The forward passes: the prefill that starts a session ([`DeviceEngine::start`]), one
//! decode step ([`DeviceEngine::step`], captured once per batch size as a CUDA graph and
//! replayed), the layer parts both run (RMSNorm, attention output and MLP, LM head), and
//! two sessions for measurements ([`DeviceEngine::synthetic`],
//! [`DeviceEngine::attention_pass`]).

use super::seeded::tensor_seed;
use super::upload::DeviceLayer;
use super::{ptr, run_op, usage, DeviceEngine, Session};
use crate::{Error, Result};
use moac::abi::{Arg, Elem};
use moac::ops::Op;
use moac_runtime::gpu::{Captured, GpuBuf};

/// Rows of prompt positions whose row-wise work (norms, projections, MLP) runs at once.
pub(super) const PREFILL_CHUNK: usize = 1024;

impl DeviceEngine {
    /// Starts a session: prefill of `prompts` (different lengths allowed) with room for
    /// `max_new` more tokens each; leaves each row's next-token logits in the session.
    pub fn start(&self, prompts: &[&[u32]], max_new: usize) -> Result<Session> {
        if let Some(row) = prompts.iter().position(|p| p.is_empty()) {
            return Err(usage(format!("prompt {row} is empty")));
        }
        let c = self.config;
        if let Some(&bad) = prompts
            .iter()
            .flat_map(|p| p.iter())
            .find(|&&t| t as usize >= c.vocab_size)
        {
            return Err(usage(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                c.vocab_size
            )));
        }
        let b = prompts.len();
        let p = prompts.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut s = self.new_session(b, p, max_new, true)?;
        let g = &self.gpu;
        let rows = b * p;
        let mut tokens = Vec::with_capacity(rows);
        let mut positions = Vec::with_capacity(rows);
        for r in prompts {
            tokens.extend(r.iter().map(|&t| t as i32));
            tokens.resize(positions.len() + p, 0);
            positions.extend(0..p as i32);
        }
        let lens: Vec<i32> = prompts.iter().map(|r| r.len() as i32).collect();
        let last: Vec<i32> = lens
            .iter()
            .enumerate()
            .map(|(i, &l)| (i * p) as i32 + l - 1)
            .collect();
        let upload_i32 = |v: &[i32]| -> Result<GpuBuf> {
            let mut buf = g.alloc_of::<i32>(v.len())?;
            g.upload(&mut buf, 0, v)?;
            Ok(buf)
        };
        let (tok_d, pos_d, lens_d, last_d) = (
            upload_i32(&tokens)?,
            upload_i32(&positions)?,
            upload_i32(&lens)?,
            upload_i32(&last)?,
        );
        let (hq, hkv, d, hid) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden);
        let qkv_w = (hq + 2 * hkv) * d;
        let chunk = PREFILL_CHUNK.min(rows);
        let mut x = g.alloc_of::<f32>(rows * hid)?;
        let mut h = g.alloc_of::<u16>(chunk * hid)?;
        let mut qkv = g.alloc_of::<f32>(chunk * qkv_w)?;
        let mut q = g.alloc_of::<u16>(rows * hq * d)?;
        let mut k = g.alloc_of::<u16>(rows * hkv * d)?;
        let mut v = g.alloc_of::<u16>(rows * hkv * d)?;
        let mut o = g.alloc_of::<u16>(rows * hq * d)?;
        let mut gu = g.alloc_of::<f32>(chunk * 2 * self.ff)?;
        let mut act = g.alloc_of::<u16>(chunk * self.ff)?;
        self.op(
            Op::Embed,
            rows,
            vec![
                ("tokens", ptr(g.addr(&tok_d, 0), Elem::Int)),
                ("table", ptr(g.addr(&self.weights.embed, 0), Elem::Scalar)),
                ("x", ptr(g.addr_mut(&mut x, 0), Elem::Float)),
                ("rows", Arg::I32(rows as i32)),
            ],
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, w) in self.weights.layers.iter().enumerate() {
            for c0 in (0..rows).step_by(chunk) {
                let m = chunk.min(rows - c0);
                self.norm(&x, c0 * hid, &w.attn_norm, None, &mut h, m)?;
                g.gemm(
                    self.dtype,
                    &mut qkv,
                    0,
                    &h,
                    0,
                    &w.wqkv,
                    0,
                    (m, qkv_w, hid),
                    0.0,
                )?;
                self.op(
                    Op::RopeQkv,
                    m,
                    vec![
                        ("qkv", ptr(g.addr(&qkv, 0), Elem::Float)),
                        ("positions", ptr(g.addr(&pos_d, c0 * 4), Elem::Int)),
                        ("pos_offset", Arg::I32(0)),
                        ("q", ptr(g.addr_mut(&mut q, c0 * hq * d * 2), Elem::Scalar)),
                        ("k", ptr(g.addr_mut(&mut k, c0 * hkv * d * 2), Elem::Scalar)),
                        ("v", ptr(g.addr_mut(&mut v, c0 * hkv * d * 2), Elem::Scalar)),
                        ("rows", Arg::I32(m as i32)),
                    ],
                )?;
            }
            let att = s.attn.layer(l)?;
            att.prefill(&q, &k, &v, &lens_d, (b, p), &mut o, self.mode, scale)?;
            att.fill(&k, &v, &lens_d, (b, p), &mut s.caches[l])?;
            for c0 in (0..rows).step_by(chunk) {
                let m = chunk.min(rows - c0);
                self.mlp(w, &mut x, c0, &o, c0 * hq * d, &mut h, &mut gu, &mut act, m)?;
            }
        }
        self.norm(&x, 0, &self.weights.norm, Some(&last_d), &mut s.bufs.h, b)?;
        self.lm_head(&mut s, b)?;
        s.lens = prompts.iter().map(|r| r.len()).collect();
        g.upload(&mut s.lens_dev, 0, &lens)?;
        g.synchronize()?;
        Ok(s)
    }

    /// out[r] = RMSNorm(x[x_off + r or row_index[r]]) * w, for `rows` rows.
    fn norm(
        &self,
        x: &GpuBuf,
        x_off: usize,
        w: &GpuBuf,
        row_index: Option<&GpuBuf>,
        out: &mut GpuBuf,
        rows: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        self.op(
            Op::RmsNorm,
            rows,
            vec![
                ("x", ptr(g.addr(x, x_off * 4), Elem::Float)),
                ("w", ptr(g.addr(w, 0), Elem::Float)),
                (
                    "row_index",
                    ptr(row_index.map_or(0, |r| g.addr(r, 0)), Elem::Int),
                ),
                ("out", ptr(g.addr_mut(out, 0), Elem::Scalar)),
                ("rows", Arg::I32(rows as i32)),
            ],
        )
    }

    /// x[r0..r0+m] += o W_o^T, then the MLP block added in the same way.
    #[allow(clippy::too_many_arguments)]
    fn mlp(
        &self,
        w: &DeviceLayer,
        x: &mut GpuBuf,
        r0: usize,
        o: &GpuBuf,
        o_off: usize,
        h: &mut GpuBuf,
        gu: &mut GpuBuf,
        act: &mut GpuBuf,
        m: usize,
    ) -> Result<()> {
        let c = &self.config;
        let (hid, attn) = (c.hidden, c.num_heads * c.head_dim);
        let g = &self.gpu;
        g.gemm(
            self.dtype,
            x,
            r0 * hid,
            o,
            o_off,
            &w.wo,
            0,
            (m, hid, attn),
            1.0,
        )?;
        self.norm(x, r0 * hid, &w.ffn_norm, None, h, m)?;
        g.gemm(
            self.dtype,
            gu,
            0,
            h,
            0,
            &w.w_gu,
            0,
            (m, 2 * self.ff, hid),
            0.0,
        )?;
        self.op(
            Op::SiluMul,
            m,
            vec![
                ("gu", ptr(g.addr(gu, 0), Elem::Float)),
                ("out", ptr(g.addr_mut(act, 0), Elem::Scalar)),
                ("rows", Arg::I32(m as i32)),
            ],
        )?;
        g.gemm(
            self.dtype,
            x,
            r0 * hid,
            act,
            0,
            &w.w_down,
            0,
            (m, hid, self.ff),
            1.0,
        )?;
        Ok(())
    }

    /// logits [rows, V] from the normed last hidden states in `s.bufs.h`.
    fn lm_head(&self, s: &mut Session, rows: usize) -> Result<()> {
        let c = &self.config;
        let head = self.weights.lm_head.as_ref().unwrap_or(&self.weights.embed);
        self.gpu.gemm(
            self.dtype,
            &mut s.bufs.logits,
            0,
            &s.bufs.h,
            0,
            head,
            0,
            (rows, c.vocab_size, c.hidden),
            0.0,
        )?;
        Ok(())
    }

    /// One decode step: feeds each row's next token (`Some`: these, uploaded; `None`:
    /// the ones [`DeviceEngine::sample`] left on the device) and leaves the logits of
    /// the token after it.
    pub fn step(&self, s: &mut Session, tokens: Option<&[u32]>) -> Result<()> {
        let c = self.config;
        let g = &self.gpu;
        let b = s.rows;
        if b == 0 {
            return Err(usage("every sequence of the session has finished"));
        }
        if let Some(t) = tokens {
            if t.len() != b {
                return Err(usage(format!("{} tokens for {b} rows", t.len())));
            }
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= c.vocab_size) {
                return Err(usage(format!("token id {bad} is outside the vocabulary")));
            }
            let ids: Vec<i32> = t.iter().map(|&x| x as i32).collect();
            g.upload(&mut s.tokens, 0, &ids)?;
        }
        if let Some(row) = s.lens.iter().position(|&l| l + 1 > s.n) {
            return Err(Error::Runtime(moac_runtime::Error::CapacityExceeded {
                layer: 0,
                row,
                tokens: s.lens[row] + 1,
                n: s.n,
            }));
        }
        if s.graph.as_ref().is_some_and(|(rows, _)| *rows != b) {
            s.graph = None;
        }
        if self.graphs && s.graph.is_none() && !s.graphs_failed {
            match g.capture(|| self.step_kernels(s)) {
                Ok(Captured::Graph(graph)) => s.graph = Some((b, graph)),
                Ok(Captured::Unsupported) => s.graphs_failed = true,
                Err(e) => {
                    // Run without graphs from here on ([`Session::graph_note`] says why).
                    s.graph_note = Some(format!(
                        "the decode step could not be captured as a CUDA graph ({e}); it runs launch by launch"
                    ));
                    s.graphs_failed = true;
                }
            }
        }
        match &s.graph {
            Some((_, graph)) => g.replay(graph)?,
            None => self.step_kernels(s)?,
        }
        for l in s.lens.iter_mut() {
            *l += 1;
        }
        s.step += 1;
        Ok(())
    }

    /// The device work of one decode step (what a graph captures): lengths advance,
    /// embedding, every layer, final norm and LM head, for the session's rows.
    fn step_kernels(&self, s: &mut Session) -> Result<()> {
        let c = self.config;
        let g = &self.gpu;
        let b = s.rows;
        let (hq, hkv, d, hid) = (c.num_heads, c.num_kv_heads, c.head_dim, c.hidden);
        let qkv_w = (hq + 2 * hkv) * d;
        self.op(
            Op::Advance,
            b,
            vec![
                ("lens", ptr(g.addr_mut(&mut s.lens_dev, 0), Elem::Int)),
                ("rows", Arg::I32(b as i32)),
            ],
        )?;
        let bf = &mut s.bufs;
        self.op(
            Op::Embed,
            b,
            vec![
                ("tokens", ptr(g.addr(&s.tokens, 0), Elem::Int)),
                ("table", ptr(g.addr(&self.weights.embed, 0), Elem::Scalar)),
                ("x", ptr(g.addr_mut(&mut bf.x, 0), Elem::Float)),
                ("rows", Arg::I32(b as i32)),
            ],
        )?;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, w) in self.weights.layers.iter().enumerate() {
            self.norm(&bf.x, 0, &w.attn_norm, None, &mut bf.h, b)?;
            g.gemm(
                self.dtype,
                &mut bf.qkv,
                0,
                &bf.h,
                0,
                &w.wqkv,
                0,
                (b, qkv_w, hid),
                0.0,
            )?;
            self.op(
                Op::RopeQkv,
                b,
                vec![
                    ("qkv", ptr(g.addr(&bf.qkv, 0), Elem::Float)),
                    ("positions", ptr(g.addr(&s.lens_dev, 0), Elem::Int)),
                    ("pos_offset", Arg::I32(-1)),
                    ("q", ptr(g.addr_mut(&mut bf.q, 0), Elem::Scalar)),
                    ("k", ptr(g.addr_mut(&mut bf.k, 0), Elem::Scalar)),
                    ("v", ptr(g.addr_mut(&mut bf.v, 0), Elem::Scalar)),
                    ("rows", Arg::I32(b as i32)),
                ],
            )?;
            let att = s.attn.layer(l)?;
            att.append(&bf.k, &bf.v, &s.lens_dev, b, &mut s.caches[l])?;
            att.decode(
                &bf.q,
                &s.caches[l],
                &s.lens_dev,
                b,
                &mut bf.scratch,
                &mut bf.o,
                scale,
            )?;
            self.mlp(
                w,
                &mut bf.x,
                0,
                &bf.o,
                0,
                &mut bf.h,
                &mut bf.gu,
                &mut bf.act,
                b,
            )?;
        }
        self.norm(&bf.x, 0, &self.weights.norm, None, &mut bf.h, b)?;
        self.lm_head(s, b)
    }

    /// A session whose caches hold `context` random tokens per row (no prefill), for
    /// throughput measurements: decode speed does not depend on the values.
    pub fn synthetic(
        &self,
        batch: usize,
        context: usize,
        max_new: usize,
        seed: u64,
    ) -> Result<Session> {
        let mut s = self.new_session(batch, context, max_new, false)?;
        let g = &self.gpu;
        for (l, c) in s.caches.iter_mut().enumerate() {
            for (j, buf) in [&mut c.k, &mut c.v].into_iter().enumerate() {
                let n = buf.bytes() / 2;
                let args = vec![
                    ("buf", ptr(g.addr_mut(buf, 0), Elem::Scalar)),
                    ("count", Arg::I64(n as i64)),
                    (
                        "seed",
                        Arg::I64(tensor_seed(seed, (1 << 20) + 2 * l as u64 + j as u64) as i64),
                    ),
                    ("scale", Arg::F32(1.0)),
                ];
                run_op(g, &self.ops, Op::FillRandom, n, args)?;
            }
        }
        s.lens = vec![context; batch];
        let lens = vec![context as i32; batch];
        g.upload(&mut s.lens_dev, 0, &lens)?;
        let tokens: Vec<i32> = (0..batch)
            .map(|i| (i % self.config.vocab_size) as i32)
            .collect();
        g.upload(&mut s.tokens, 0, &tokens)?;
        g.synchronize()?;
        Ok(s)
    }

    /// The decode attention (and merge) of every layer for the session's rows as they
    /// are, without appending: what a step spends in attention.
    pub fn attention_pass(&self, s: &mut Session) -> Result<()> {
        let scale = 1.0 / (self.config.head_dim as f32).sqrt();
        for (l, c) in s.caches.iter().enumerate() {
            s.attn.layer(l)?.decode(
                &s.bufs.q,
                c,
                &s.lens_dev,
                s.rows,
                &mut s.bufs.scratch,
                &mut s.bufs.o,
                scale,
            )?;
        }
        Ok(())
    }
}
