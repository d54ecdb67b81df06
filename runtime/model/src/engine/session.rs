//! A [`Session`]: a batch of sequences being decoded, with its caches and every buffer
//! a step needs, allocated once ([`DeviceEngine`]'s `new_session`); finished sequences
//! leave it ([`DeviceEngine::retain`]); its accessors report rows, lengths and bytes.

use super::{usage, DeviceEngine};
use crate::{Error, Result};
use moac::geometry::{CacheGeometry, Dtype};
use moac_runtime::gpu::attention::{DecodeScratch, DeviceAttention, DeviceKv};
use moac_runtime::gpu::{GpuBuf, GpuGraph};

/// A batch of sequences being decoded: its caches and every buffer a step needs,
/// allocated once.
pub struct Session {
    /// Rows still in the batch.
    pub(super) rows: usize,
    /// The sequence (its index in the prompts) each row holds.
    pub(super) seq_ids: Vec<usize>,
    /// Tokens each row holds (prompt + generated so far).
    pub(super) lens: Vec<usize>,
    pub(super) n: usize,
    pub(super) attn: DeviceAttention,
    pub(super) caches: Vec<DeviceKv>,
    pub(super) lens_dev: GpuBuf,
    pub(super) seq_ids_dev: GpuBuf,
    pub(super) tokens: GpuBuf,
    pub(super) step: usize,
    pub(super) bufs: StepBufs,
    /// The decode step captured as a CUDA graph, for this many rows.
    pub(super) graph: Option<(usize, GpuGraph)>,
    /// Capture failed (or the machine has no graphs): steps run launch by launch.
    pub(super) graphs_failed: bool,
    /// Why a capture failed.
    pub(super) graph_note: Option<String>,
}

/// Buffers of a decode step for the batch's first size.
pub(super) struct StepBufs {
    pub(super) x: GpuBuf,
    pub(super) h: GpuBuf,
    pub(super) qkv: GpuBuf,
    pub(super) q: GpuBuf,
    pub(super) k: GpuBuf,
    pub(super) v: GpuBuf,
    pub(super) scratch: DecodeScratch,
    pub(super) o: GpuBuf,
    pub(super) gu: GpuBuf,
    pub(super) act: GpuBuf,
    pub(super) logits: GpuBuf,
}

impl DeviceEngine {
    pub(super) fn new_session(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<Session> {
        if batch == 0 {
            return Err(usage("no prompt"));
        }
        let n = prompt_len + max_new;
        if n > self.config.context_len {
            return Err(Error::TooLong {
                what: "prompt + new tokens".into(),
                len: n,
                max: self.config.context_len,
            });
        }
        self.check_fits(batch, prompt_len, max_new, with_prefill)?;
        let attn = DeviceAttention::new(&self.gpu, &self.artifact, prompt_len, max_new)?;
        let c = &self.config;
        let g = &self.gpu;
        let caches = (0..c.num_layers)
            .map(|l| attn.new_cache(l, batch))
            .collect::<moac_runtime::Result<Vec<_>>>()?;
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let bufs = StepBufs {
            x: g.alloc_of::<f32>(batch * c.hidden)?,
            h: g.alloc_of::<u16>(batch * c.hidden)?,
            qkv: g.alloc_of::<f32>(batch * (hq + 2 * hkv) * d)?,
            q: g.alloc_of::<u16>(batch * hq * d)?,
            k: g.alloc_of::<u16>(batch * hkv * d)?,
            v: g.alloc_of::<u16>(batch * hkv * d)?,
            scratch: attn.scratch(batch)?,
            o: g.alloc_of::<u16>(batch * hq * d)?,
            gu: g.alloc_of::<f32>(batch * 2 * self.ff)?,
            act: g.alloc_of::<u16>(batch * self.ff)?,
            logits: g.alloc_of::<f32>(batch * c.vocab_size)?,
        };
        let ids: Vec<i32> = (0..batch as i32).collect();
        let mut seq_ids_dev = g.alloc_of::<i32>(batch)?;
        g.upload(&mut seq_ids_dev, 0, &ids)?;
        Ok(Session {
            rows: batch,
            seq_ids: (0..batch).collect(),
            lens: vec![0; batch],
            n,
            attn,
            caches,
            lens_dev: g.alloc_of::<i32>(batch)?,
            seq_ids_dev,
            tokens: g.alloc_of::<i32>(batch)?,
            step: 0,
            bufs,
            graph: None,
            graphs_failed: false,
            graph_note: None,
        })
    }

    /// Removes finished sequences: keeps the rows whose sequence ids are in `keep`,
    /// in their order, closing up the caches and per-row buffers so later steps run
    /// only the rows left.
    pub fn retain(&self, s: &mut Session, keep: impl Fn(usize) -> bool) -> Result<()> {
        let g = &self.gpu;
        let mut to = 0;
        for from in 0..s.rows {
            if !keep(s.seq_ids[from]) {
                continue;
            }
            if to != from {
                for (l, c) in s.caches.iter_mut().enumerate() {
                    let row = s.attn.shape(l)?.cache_elems(1) * 2;
                    g.move_row(&mut c.k, to, from, row)?;
                    g.move_row(&mut c.v, to, from, row)?;
                }
                g.move_row(&mut s.lens_dev, to, from, 4)?;
                g.move_row(&mut s.tokens, to, from, 4)?;
                g.move_row(&mut s.seq_ids_dev, to, from, 4)?;
                s.seq_ids[to] = s.seq_ids[from];
                s.lens[to] = s.lens[from];
            }
            to += 1;
        }
        s.rows = to;
        s.seq_ids.truncate(to);
        s.lens.truncate(to);
        Ok(())
    }
}

impl Session {
    /// Whether the last decode step ran as a replayed CUDA graph.
    pub fn graphed(&self) -> bool {
        self.graph.is_some()
    }

    /// Why decode steps are not captured as a graph, if a capture failed.
    pub fn graph_note(&self) -> Option<&str> {
        self.graph_note.as_deref()
    }

    /// Bytes of every device buffer the session holds (caches, per-row state and the
    /// decode step's buffers).
    pub fn device_bytes(&self) -> u64 {
        let b = &self.bufs;
        let step = [
            &b.x, &b.h, &b.qkv, &b.q, &b.k, &b.v, &b.o, &b.gu, &b.act, &b.logits,
        ]
        .iter()
        .map(|x| x.bytes())
        .sum::<usize>()
            + b.scratch.bytes();
        let rows = self.lens_dev.bytes() + self.seq_ids_dev.bytes() + self.tokens.bytes();
        self.kv_bytes() + (step + rows) as u64
    }

    /// Rows still decoding.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The sequence (index into the prompts) of each row.
    pub fn seq_ids(&self) -> &[usize] {
        &self.seq_ids
    }

    /// Tokens held by each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// N, the tokens a row may hold.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of moac's compacted cache for the rows the session was started with.
    pub fn kv_bytes(&self) -> u64 {
        self.caches
            .iter()
            .map(|c| (c.k.bytes() + c.v.bytes()) as u64)
            .sum()
    }

    /// The geometry the cache was sized with.
    pub fn geometry(&self) -> &CacheGeometry {
        self.attn.geometry()
    }

    /// Bytes the decode attention reads per step for the current rows and lengths:
    /// each KV head's filled slots (min(len, capacity)) of K and V.
    pub fn attention_bytes(&self, dtype: Dtype) -> u64 {
        let mut bytes = 0u64;
        for l in self.attn.layers() {
            let Ok(s) = self.attn.shape(l) else { continue };
            for &len in &self.lens {
                for &cap in &s.kv_capacity {
                    bytes += (len.min(cap) * s.head_dim * 2) as u64 * dtype.size_bytes();
                }
            }
        }
        bytes
    }
}
