//! The `cpu` backend: MoA attention computed directly on the compacted cache, fast
//! enough to run real models on the CPU. The cache is K and V `[B, total_slots, D]` as
//! element bits (the layout of every backend), appended in place; attention reads each
//! query head's window straight from it, the query heads of one KV head sharing every
//! key row they load (GQA), with an online softmax in f32 (no score buffer); work is
//! spread over threads by (row, KV head) in decode and by (row, query position) in
//! prefill, and a step allocates nothing but its output. The obviously-right oracle is
//! [`crate::reference`] (candle-core, and the tests' float64 brute force).

use super::{check_prompt, check_steps, HostCache};
use super::{LayerBackend, LayerShape, Prompt};
use crate::error::{expect_len, Error, Result};
use crate::reference::semantics::{block64_sees, decode_sees, slot_of, token_sees};
use candle_core::{DType, Tensor};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;

/// The candle dtype of an element type.
pub fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Element bits as a tensor of the element type.
pub fn tensor_of(bits: &[u16], dtype: Dtype, dims: &[usize]) -> Result<Tensor> {
    let f: Vec<f32> = bits.iter().map(|&b| super::from_bits(b, dtype)).collect();
    Ok(Tensor::from_vec(f, dims, &candle_core::Device::Cpu)?.to_dtype(candle_dtype(dtype))?)
}

/// A tensor's values as element bits (rounded to the element type).
pub fn bits_of(t: &Tensor, dtype: Dtype) -> Result<Vec<u16>> {
    let f = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f.iter().map(|&x| super::to_bits(x, dtype)).collect())
}

/// Largest head_dim and group size the stack buffers hold.
const MAX_D: usize = 256;
const MAX_G: usize = moac::ir::MAX_GROUP;

/// Element bits to f32, the dtype's conversion chosen once per row.
fn load(row: &[u16], dtype: Dtype, out: &mut [f32]) {
    match dtype {
        Dtype::F16 => {
            for (o, &b) in out.iter_mut().zip(row) {
                *o = half::f16::from_bits(b).to_f32();
            }
        }
        Dtype::Bf16 => {
            for (o, &b) in out.iter_mut().zip(row) {
                *o = half::bf16::from_bits(b).to_f32();
            }
        }
    }
}

/// Rounds outputs to the storage dtype, as the kernels write O (so every backend returns
/// the same values, and a model run through cpu matches one through emu or cuda).
fn round_to(out: &mut [f32], dtype: Dtype) {
    for x in out.iter_mut() {
        *x = super::from_bits(super::to_bits(*x, dtype), dtype);
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The online softmaxes of the query heads of one KV head (at most `MAX_G`), each over
/// the keys its own window shows: running max and sum per head, weighted values summed
/// in f32. No score buffer: one pass over the keys.
struct GroupSoftmax {
    state: [(f32, f32); MAX_G],
    acc: [f32; MAX_G * MAX_D],
}

impl GroupSoftmax {
    fn new() -> GroupSoftmax {
        GroupSoftmax {
            state: [(f32::NEG_INFINITY, 0.0); MAX_G],
            acc: [0.0; MAX_G * MAX_D],
        }
    }

    /// Back to no keys for the first `g` heads of `d` values.
    fn reset(&mut self, g: usize, d: usize) {
        self.state[..g].fill((f32::NEG_INFINITY, 0.0));
        self.acc[..g * d].fill(0.0);
    }

    /// Head `x` sees a key with `score` and value `v`.
    fn add(&mut self, x: usize, score: f32, v: &[f32]) {
        let d = v.len();
        let acc = &mut self.acc[x * d..(x + 1) * d];
        let (max, sum) = &mut self.state[x];
        if score > *max {
            let c = (*max - score).exp();
            *sum *= c;
            for a in acc.iter_mut() {
                *a *= c;
            }
            *max = score;
        }
        let w = (score - *max).exp();
        *sum += w;
        for (a, &y) in acc.iter_mut().zip(v) {
            *a += w * y;
        }
    }

    /// Head `x`'s attention output (zeros where it saw no key).
    fn finish(&self, x: usize, out: &mut [f32]) {
        let d = out.len();
        let sum = self.state[x].1;
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for (o, &a) in out.iter_mut().zip(&self.acc[x * d..(x + 1) * d]) {
            *o = a * inv;
        }
    }
}

/// Runs `f(i, chunk)` over `out` cut into chunks of `chunk` values, on the CPU's cores.
fn parallel_chunks(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let n = out.len() / chunk.max(1);
    let threads = std::thread::available_parallelism()
        .map(|t| t.get())
        .unwrap_or(1)
        .min(n.max(1));
    if threads <= 1 {
        for (i, c) in out.chunks_mut(chunk).enumerate() {
            f(i, c);
        }
        return;
    }
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per * chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, c) in part.chunks_mut(chunk).enumerate() {
                    f(t * per + i, c);
                }
            });
        }
    });
}

/// One layer on the CPU, with its cache.
pub struct CpuLayer {
    shape: LayerShape,
    dtype: Dtype,
    cache: HostCache,
}

impl CpuLayer {
    /// The layer with an empty cache ([`LayerBackend::new_cache`] makes one).
    pub fn new(shape: LayerShape, dtype: Dtype) -> Result<CpuLayer> {
        if shape.head_dim > MAX_D || shape.group_size() > MAX_G {
            return Err(Error::Usage(format!(
                "cpu backend: head_dim {} and group {} (at most {MAX_D} and {MAX_G})",
                shape.head_dim,
                shape.group_size()
            )));
        }
        Ok(CpuLayer {
            shape,
            dtype,
            cache: HostCache {
                batch: 0,
                k: Vec::new(),
                v: Vec::new(),
            },
        })
    }

    fn check_cache(&self, batch: usize) -> Result<()> {
        let n = self.shape.cache_elems(batch);
        if self.cache.batch != batch || self.cache.k.len() != n {
            return Err(Error::shape(
                "cache",
                format!("{batch} rows ([B,total_slots,D])"),
                format!("{} rows", self.cache.batch),
            ));
        }
        Ok(())
    }
}

impl LayerBackend for CpuLayer {
    fn shape(&self) -> &LayerShape {
        &self.shape
    }

    fn new_cache(&mut self, batch: usize) -> Result<()> {
        let n = self.shape.cache_elems(batch);
        self.cache = HostCache {
            batch,
            k: vec![0; n],
            v: vec![0; n],
        };
        Ok(())
    }

    fn prefill(&self, q: &[u16], pr: &Prompt, mode: PrefillMode, scale: f32) -> Result<Vec<f32>> {
        check_prompt(&self.shape, Some(q), pr)?;
        let s = &self.shape;
        let (hq, hkv, d, g, p) = (
            s.num_query_heads,
            s.num_kv_heads,
            s.head_dim,
            s.group_size(),
            pr.p,
        );
        let mut out = vec![0f32; q.len()];
        let dtype = self.dtype;
        // One task per (row, query position): all query heads of that token.
        parallel_chunks(&mut out, hq * d, |task, o| {
            let (b, i) = (task / p.max(1), task % p.max(1));
            if i >= pr.lens[b].max(0) as usize {
                return; // padding rows stay zero
            }
            let mut qf = [0f32; MAX_G * MAX_D];
            let mut kf = [0f32; MAX_D];
            let mut vf = [0f32; MAX_D];
            let mut sm = GroupSoftmax::new();
            for j in 0..hkv {
                sm.reset(g, d);
                for x in 0..g {
                    let qrow = ((b * p + i) * hq + j * g + x) * d;
                    load(&q[qrow..qrow + d], dtype, &mut qf[x * d..(x + 1) * d]);
                }
                // The keys the widest head of the group sees (the sink, then a band
                // ending at i); each head keeps those its own rule shows it.
                let widest = (0..g).map(|x| s.query_local(j * g + x)).max().unwrap_or(0);
                let lo = match mode {
                    PrefillMode::Token => (i + 1).saturating_sub(widest),
                    PrefillMode::Block64 => ((i / 64 + 1).saturating_sub(widest / 64)) * 64,
                }
                .max(s.sink.min(i + 1));
                let keys = (0..s.sink.min(i + 1)).chain(lo..=i);
                for kpos in keys {
                    let row = ((b * p + kpos) * hkv + j) * d;
                    load(&pr.k[row..row + d], dtype, &mut kf[..d]);
                    let mut v_loaded = false;
                    for x in 0..g {
                        let h = j * g + x;
                        let local = s.query_local(h);
                        let seen = match mode {
                            PrefillMode::Token => token_sees(i, kpos, s.sink, local),
                            PrefillMode::Block64 => block64_sees(i, kpos, s.sink, local),
                        };
                        if !seen {
                            continue;
                        }
                        if !v_loaded {
                            load(&pr.v[row..row + d], dtype, &mut vf[..d]);
                            v_loaded = true;
                        }
                        let score = dot(&qf[x * d..(x + 1) * d], &kf[..d]) * scale;
                        sm.add(x, score, &vf[..d]);
                    }
                }
                for x in 0..g {
                    let h = j * g + x;
                    sm.finish(x, &mut o[h * d..(h + 1) * d]);
                }
            }
        });
        round_to(&mut out, self.dtype);
        Ok(out)
    }

    fn fill(&mut self, pr: &Prompt) -> Result<()> {
        check_prompt(&self.shape, None, pr)?;
        let b_ = pr.lens.len();
        self.check_cache(b_)?;
        let s = &self.shape;
        let (hkv, d) = (s.num_kv_heads, s.head_dim);
        for (b, &len) in pr.lens.iter().enumerate() {
            let len = len.max(0) as usize;
            for j in 0..hkv {
                let ring = s.kv_capacity[j] - s.sink;
                // The positions that survive in the ring: the sink and the last `ring`.
                let tail = len.saturating_sub(ring).max(s.sink.min(len));
                for pos in (0..s.sink.min(len)).chain(tail..len) {
                    let src = ((b * pr.p + pos) * hkv + j) * d;
                    let dst = (b * s.total_slots
                        + s.kv_offset[j]
                        + slot_of(pos, s.sink, s.kv_capacity[j]))
                        * d;
                    self.cache.k[dst..dst + d].copy_from_slice(&pr.k[src..src + d]);
                    self.cache.v[dst..dst + d].copy_from_slice(&pr.v[src..src + d]);
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()> {
        let s = &self.shape;
        let b_ = seq_lens.len();
        self.check_cache(b_)?;
        let (hkv, d) = (s.num_kv_heads, s.head_dim);
        expect_len("k_new", "[B,Hkv,D]", b_ * hkv * d, k_new.len())?;
        expect_len("v_new", "[B,Hkv,D]", b_ * hkv * d, v_new.len())?;
        check_steps(s, seq_lens)?;
        for (b, &t) in seq_lens.iter().enumerate() {
            for j in 0..hkv {
                let src = (b * hkv + j) * d;
                let slot = slot_of(t as usize - 1, s.sink, s.kv_capacity[j]);
                let dst = (b * s.total_slots + s.kv_offset[j] + slot) * d;
                self.cache.k[dst..dst + d].copy_from_slice(&k_new[src..src + d]);
                self.cache.v[dst..dst + d].copy_from_slice(&v_new[src..src + d]);
            }
        }
        Ok(())
    }

    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>> {
        let s = &self.shape;
        let b_ = seq_lens.len();
        self.check_cache(b_)?;
        let (hq, hkv, d, g) = (
            s.num_query_heads,
            s.num_kv_heads,
            s.head_dim,
            s.group_size(),
        );
        expect_len("q", "[B,Hq,D]", b_ * hq * d, q.len())?;
        check_steps(s, seq_lens)?;
        let mut out = vec![0f32; q.len()];
        let (dtype, cache) = (self.dtype, &self.cache);
        // One task per (row, KV head): its query heads are contiguous in q and out.
        parallel_chunks(&mut out, g * d, |task, o| {
            let (b, j) = (task / hkv, task % hkv);
            let t = seq_lens[b] as usize;
            let cap = s.kv_capacity[j];
            let mut qf = [0f32; MAX_G * MAX_D];
            let mut kf = [0f32; MAX_D];
            let mut vf = [0f32; MAX_D];
            let mut sm = GroupSoftmax::new();
            for x in 0..g {
                let row = (b * hq + j * g + x) * d;
                load(&q[row..row + d], dtype, &mut qf[x * d..(x + 1) * d]);
            }
            let widest = (0..g).map(|x| s.query_local(j * g + x)).max().unwrap_or(0);
            let sink_end = s.sink.min(t);
            let lo = t.saturating_sub(widest).max(sink_end);
            for pos in (0..sink_end).chain(lo..t) {
                let row = (b * s.total_slots + s.kv_offset[j] + slot_of(pos, s.sink, cap)) * d;
                load(&cache.k[row..row + d], dtype, &mut kf[..d]);
                load(&cache.v[row..row + d], dtype, &mut vf[..d]);
                for x in 0..g {
                    if !decode_sees(t, s.sink, s.query_local(j * g + x), pos) {
                        continue;
                    }
                    let score = dot(&qf[x * d..(x + 1) * d], &kf[..d]) * scale;
                    sm.add(x, score, &vf[..d]);
                }
            }
            for x in 0..g {
                sm.finish(x, &mut o[x * d..(x + 1) * d]);
            }
        });
        round_to(&mut out, self.dtype);
        Ok(out)
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        Ok(self.cache.clone())
    }
}
