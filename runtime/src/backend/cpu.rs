//! The `cpu` backend: MoA attention computed directly on the compacted cache, fast
//! enough to run real models on the CPU. The cache is K and V `[B, total_slots, D]` as
//! element bits (the layout of every backend), appended in place. Attention is tiled:
//! keys and values are widened to f32 a block of 64 positions at a time (prefill: the
//! whole prompt once per call; decode: each block of the window straight from the
//! cache's slot runs), every block serves all query heads of its KV head (GQA), scores
//! are 64-wide multiply-adds the compiler vectorizes over a transposed key block
//! (prefill, where a block serves up to 64 query rows per head) or, in decode, 8-wide
//! multiply-adds along each key row summed across by an AVX2 add tree (no transpose for
//! the few query heads of a group), and each query row keeps an online softmax in f32
//! rescaled once per block. Blocks no head of a group sees are skipped,
//! blocks partly seen are masked element by element with the rules of
//! [`crate::reference::semantics`]. Work runs on rayon's pool (RAYON_NUM_THREADS, by
//! default one thread per core) by (row, KV head, block of 64 queries) in prefill and by
//! (row, KV head, part of 512 positions of the window) in decode, the parts merged
//! afterwards. The obviously-right oracle is
//! [`crate::reference`] (candle-core, and the tests' float64 brute force).

use super::{check_prompt, check_steps, HostCache};
use super::{LayerBackend, LayerShape, Prompt};
use crate::error::{expect_len, Error, Result};
use crate::reference::semantics::{block64_sees, decode_sees, slot_of, token_sees};
use candle_core::{DType, Tensor};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use rayon::prelude::*;

/// Sets the number of threads of the pool the CPU work runs on (the cpu backend's
/// attention, the model's products): once, before any parallel work. Without a call,
/// `RAYON_NUM_THREADS` or one thread per core.
pub fn set_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Usage("--threads must be at least 1".into()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Usage(format!("cannot set the thread count to {n}: {e}")))
}

/// The candle dtype of an element type.
pub fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Element bits as a tensor of the element type.
pub fn tensor_of(bits: &[u16], dtype: Dtype, dims: &[usize]) -> Result<Tensor> {
    let f: Vec<f32> = bits.iter().map(|&b| dtype.from_bits(b)).collect();
    Ok(Tensor::from_vec(f, dims, &candle_core::Device::Cpu)?.to_dtype(candle_dtype(dtype))?)
}

/// A tensor's values as element bits (rounded to the element type).
pub fn bits_of(t: &Tensor, dtype: Dtype) -> Result<Vec<u16>> {
    let f = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f.iter().map(|&x| dtype.to_bits(x)).collect())
}

/// Largest head_dim and group size the backend accepts (the limits it has always had;
/// the tiles themselves size their buffers from the shape).
const MAX_D: usize = 256;
const MAX_G: usize = moac::ir::MAX_GROUP;

/// Keys per block, and query positions per prefill tile.
const BLOCK: usize = 64;

/// Blocks per part of a decode window (each part one task, merged afterwards).
const PART_BLOCKS: usize = 8;

/// `a * b + c`: fused where the CPU has FMA (the vectorizer turns it into vfmadd), a
/// plain multiply and add where it has not (a software fma would be slow).
#[inline(always)]
pub fn madd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// Element bits to f32 (exact), `src` and `dst` of one length.
fn widen(src: &[u16], dtype: Dtype, dst: &mut [f32]) {
    match dtype {
        // half converts slices eight at a time with F16C where it is compiled in.
        Dtype::F16 => src
            .reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(dst),
        // bf16 is the high half of an f32.
        Dtype::Bf16 => {
            for (o, &b) in dst.iter_mut().zip(src) {
                *o = f32::from_bits(u32::from(b) << 16);
            }
        }
    }
}

/// Rounds outputs to the storage dtype, as the kernels write O (so every backend returns
/// the same values, and a model run through cpu matches one through emu or cuda).
fn round_to(out: &mut [f32], dtype: Dtype) {
    for x in out.iter_mut() {
        *x = dtype.round(*x);
    }
}

/// e^x for the softmax's arguments (x <= 0; -inf gives 0), in a form the compiler
/// vectorizes (no calls, no float-to-int conversions): x = n ln2 + r with n an integer
/// and |r| <= ln2/2 (ln2 split in two so that r is exact to f32), e^r by its Taylor
/// series to r^7 (truncation below 1e-8 relative, under f32's 6e-8 half ulp), times 2^n
/// built in the exponent bits. Rounding x/ln2 to the integer n is done by adding
/// 1.5 * 2^23, whose sum holds n in its low mantissa bits. Below -87 (e^-87 = 1.6e-38,
/// the bottom of f32's normal range) the result is 0: such a weight is below f32's
/// resolution of any softmax sum, which holds a weight of 1.
#[inline(always)]
pub fn exp_le0(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4; // 355/512, exact in f32
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 - LN2_HI
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let xc = x.clamp(-87.0, 88.0);
    let t = madd(xc, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = madd(n, -LN2_LO, madd(n, -LN2_HI, xc));
    let mut p = 1.0 / 5040.0;
    p = madd(p, r, 1.0 / 720.0);
    p = madd(p, r, 1.0 / 120.0);
    p = madd(p, r, 1.0 / 24.0);
    p = madd(p, r, 1.0 / 6.0);
    p = madd(p, r, 0.5);
    p = madd(p, r, 1.0);
    p = madd(p, r, 1.0);
    // t's bits are those of ROUND plus n (n in -126..=127 here); 2^n has the biased
    // exponent n + 127.
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let two_n = f32::from_bits(biased << 23);
    if x < -87.0 {
        0.0
    } else {
        p * two_n
    }
}

/// Scores of one query row against a key block held transposed (`kt` is [D][BLOCK]):
/// `s[c] = q . k_c`, as BLOCK-wide multiply-adds per dimension (no horizontal sums).
#[inline(always)]
fn block_scores(q: &[f32], kt: &[f32], s: &mut [f32; BLOCK]) {
    let mut acc = [0f32; BLOCK];
    for (&a, col) in q.iter().zip(kt.chunks_exact(BLOCK)) {
        for (x, &k) in acc.iter_mut().zip(col) {
            *x = madd(a, k, *x);
        }
    }
    *s = acc;
}

/// Scores of one query row against a block of key rows held as they are (`k` is
/// [BLOCK][D], D a multiple of 8): eight keys at a time, each an 8-lane multiply-add
/// over D, the eight lane vectors summed across by one add tree. No transpose of the
/// block, which in decode (a block serves only the few query heads of one group) costs
/// more than the scores. `None` where the CPU lacks AVX2 and FMA.
#[inline]
fn block_scores_rows(q: &[f32], k: &[f32], nk: usize, s: &mut [f32; BLOCK]) -> Option<()> {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let has = *HAS
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        let d = q.len();
        if has && d.is_multiple_of(8) && k.len() >= BLOCK * d {
            // SAFETY: AVX2 and FMA were detected just above; the slices hold the
            // lengths the kernel reads (checked above: q is D long, k BLOCK x D).
            unsafe { rows_avx2::scores(q, k, nk, s) };
            return Some(());
        }
    }
    let _ = (q, k, nk, s);
    None
}

#[cfg(target_arch = "x86_64")]
mod rows_avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// s[c] = q . k[c] for the groups of eight keys that hold any of the first `nk`.
    #[target_feature(enable = "avx2,fma")]
    pub fn scores(q: &[f32], k: &[f32], nk: usize, s: &mut [f32; BLOCK]) {
        let d = q.len();
        for c0 in (0..nk.min(BLOCK)).step_by(8) {
            let mut v = [_mm256_setzero_ps(); 8];
            for (r, acc) in v.iter_mut().enumerate() {
                let row = &k[(c0 + r) * d..(c0 + r + 1) * d];
                for (qc, kc) in q.chunks_exact(8).zip(row.chunks_exact(8)) {
                    // SAFETY: unaligned loads of exactly the eight floats of each chunk.
                    let (a, b) =
                        unsafe { (_mm256_loadu_ps(qc.as_ptr()), _mm256_loadu_ps(kc.as_ptr())) };
                    *acc = _mm256_fmadd_ps(a, b, *acc);
                }
            }
            // Sum each vector's eight lanes: pairwise adds leave key r's partial sums in
            // lane r of each 128-bit half; the halves are then added.
            let h01 = _mm256_hadd_ps(v[0], v[1]);
            let h23 = _mm256_hadd_ps(v[2], v[3]);
            let h45 = _mm256_hadd_ps(v[4], v[5]);
            let h67 = _mm256_hadd_ps(v[6], v[7]);
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let lo = _mm256_permute2f128_ps(h0123, h4567, 0x20);
            let hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
            let sum = _mm256_add_ps(lo, hi);
            // SAFETY: c0 + 8 <= BLOCK: eight floats of `s` from c0.
            unsafe { _mm256_storeu_ps(s[c0..c0 + 8].as_mut_ptr(), sum) };
        }
    }
}

/// One query row's online softmax: running max `m`, running sum `l`, and the weighted
/// sum of values `o` ([D]), all f32.
struct RowState<'a> {
    m: &'a mut f32,
    l: &'a mut f32,
    o: &'a mut [f32],
}

/// Takes one key block into a row's softmax: `s` holds the scores (masked keys and
/// columns past the block's `nk` keys at -inf), `v` the block's values ([BLOCK][D],
/// rows past `nk` unused). One rescale of the running sums per block.
#[inline(always)]
fn softmax_block(s: &mut [f32; BLOCK], v: &[f32], nk: usize, row: RowState) {
    let d = row.o.len();
    // Max and sum in eight independent lanes (a float reduction in one chain would not
    // be vectorized, its order being fixed).
    let mut lanes = [f32::NEG_INFINITY; 8];
    for chunk in s.chunks_exact(8) {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let bmax = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    if bmax == f32::NEG_INFINITY {
        return; // no key of this block is seen by this row
    }
    let m_new = row.m.max(bmax);
    let corr = exp_le0(*row.m - m_new); // 0 at the first block (m = -inf)
    for x in s.iter_mut() {
        *x = exp_le0(*x - m_new);
    }
    let mut lanes = [0f32; 8];
    for chunk in s.chunks_exact(8) {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    let sum: f32 = lanes.iter().sum();
    *row.m = m_new;
    *row.l = madd(*row.l, corr, sum);
    // O = O * corr + P V, in BLOCK-wide pieces of the row kept in registers where D
    // allows, else element by element. Zero weights (masked keys, or weights below
    // f32's range) are skipped, so a masked key's value is never read.
    if d.is_multiple_of(BLOCK) {
        for (piece, o) in row.o.chunks_exact_mut(BLOCK).enumerate() {
            let mut acc = [0f32; BLOCK];
            for (a, &x) in acc.iter_mut().zip(o.iter()) {
                *a = x * corr;
            }
            for (c, &w) in s[..nk].iter().enumerate() {
                if w == 0.0 {
                    continue;
                }
                let vr = &v[c * d + piece * BLOCK..c * d + (piece + 1) * BLOCK];
                for (a, &y) in acc.iter_mut().zip(vr) {
                    *a = madd(w, y, *a);
                }
            }
            o.copy_from_slice(&acc);
        }
    } else {
        for x in row.o.iter_mut() {
            *x *= corr;
        }
        for (c, &w) in s[..nk].iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            for (a, &y) in row.o.iter_mut().zip(&v[c * d..(c + 1) * d]) {
                *a = madd(w, y, *a);
            }
        }
    }
}

/// The online softmaxes of the query rows of a tile (rows of all query heads of one KV
/// head): max, sum and weighted values per row.
struct Accum {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
    d: usize,
}

impl Accum {
    fn new(rows: usize, d: usize) -> Accum {
        Accum {
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            o: vec![0.0; rows * d],
            d,
        }
    }

    fn row(&mut self, i: usize) -> RowState<'_> {
        let d = self.d;
        RowState {
            m: &mut self.m[i],
            l: &mut self.l[i],
            o: &mut self.o[i * d..(i + 1) * d],
        }
    }

    /// Row `i`'s attention output from the states of several parts of its keys: each
    /// part's sums rescaled to the largest maximum (zeros where no part saw a key).
    fn merge(parts: &[Accum], i: usize, out: &mut [f32]) {
        let d = out.len();
        let m = parts.iter().fold(f32::NEG_INFINITY, |a, p| a.max(p.m[i]));
        out.fill(0.0);
        if m == f32::NEG_INFINITY {
            return;
        }
        let mut l = 0f32;
        for p in parts {
            let c = exp_le0(p.m[i] - m);
            l = madd(p.l[i], c, l);
            for (o, &a) in out.iter_mut().zip(&p.o[i * d..(i + 1) * d]) {
                *o = madd(a, c, *o);
            }
        }
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        out.iter_mut().for_each(|o| *o *= inv);
    }

    /// Row `i`'s attention output (zeros where it saw no key).
    fn finish(&self, i: usize, out: &mut [f32]) {
        let d = self.d;
        let inv = if self.l[i] > 0.0 {
            1.0 / self.l[i]
        } else {
            0.0
        };
        for (o, &a) in out.iter_mut().zip(&self.o[i * d..(i + 1) * d]) {
            *o = a * inv;
        }
    }
}

/// Masks a block's scores: keys past `nk` always, and where `seen(r, c)` is false.
fn mask_scores(s: &mut [f32; BLOCK], nk: usize, partial: bool, seen: impl Fn(usize) -> bool) {
    for (c, x) in s.iter_mut().enumerate() {
        if c >= nk || (partial && !seen(c)) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// One (row, KV head) of a prompt in f32, blocked for the tiles: K transposed per block
/// (`kt`: [blocks][D][BLOCK]) and V by rows (`v`: [blocks * BLOCK][D]), positions past
/// the prompt's length zero.
struct PromptKv {
    kt: Vec<f32>,
    v: Vec<f32>,
}

impl PromptKv {
    fn new(pr: &Prompt, dtype: Dtype, hkv: usize, d: usize, b: usize, j: usize) -> PromptKv {
        let len = pr.lens[b].max(0) as usize;
        let blocks = len.div_ceil(BLOCK);
        let mut kt = vec![0f32; blocks * BLOCK * d];
        let mut v = vec![0f32; blocks * BLOCK * d];
        let mut krow = vec![0f32; d];
        for pos in 0..len {
            let src = ((b * pr.p + pos) * hkv + j) * d;
            widen(&pr.k[src..src + d], dtype, &mut krow);
            let (blk, c) = (pos / BLOCK, pos % BLOCK);
            let dst = &mut kt[blk * BLOCK * d..(blk + 1) * BLOCK * d];
            for (i, &x) in krow.iter().enumerate() {
                dst[i * BLOCK + c] = x;
            }
            widen(&pr.v[src..src + d], dtype, &mut v[pos * d..(pos + 1) * d]);
        }
        PromptKv { kt, v }
    }
}

/// Which keys of block `kb` (positions `k0..k0+nk`) the query rows `q0..q1` of one head
/// see: `None` none, `Some(false)` all of them, `Some(true)` some (mask per element).
/// "All" is decided from the rule's shape (causal, then a sink block or inside the band
/// for the block's extreme rows); otherwise `sees` (the rule itself) decides.
fn prefill_block_kind(
    mode: PrefillMode,
    (q0, q1): (usize, usize),
    (k0, nk): (usize, usize),
    sink: usize,
    local: usize,
    sees: impl Fn(usize, usize) -> bool,
) -> Option<bool> {
    let causal = k0 + nk - 1 <= q0;
    let inside = match mode {
        PrefillMode::Token => k0 + nk <= sink || k0 + local >= q1,
        PrefillMode::Block64 => {
            let (kb, qb) = (k0 / BLOCK, q0 / BLOCK);
            kb < sink / BLOCK || kb + local / BLOCK > qb
        }
    };
    if causal && inside {
        return Some(false);
    }
    // Under both rules the queries seeing key k form an interval starting at k, so k is
    // seen by some row of q0..q1 exactly when it is seen by the first row at or after it.
    let any = (k0..k0 + nk).any(|k| k < q1 && sees(q0.max(k), k));
    any.then_some(true)
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

    /// Prefill attention of one tile: the query positions `qb*BLOCK..` (up to the row's
    /// length) of every query head of KV head `j` in row `b`, over the key blocks any head
    /// of the group sees (the sink blocks and the band ending at the tile), each block's
    /// scores computed for all heads from one f32 copy of the block. Returns the outputs
    /// as [G][rows][D].
    fn prefill_tile(
        &self,
        q: &[u16],
        pr: &Prompt,
        kv: &PromptKv,
        mode: PrefillMode,
        scale: f32,
        (b, j, qb): (usize, usize, usize),
    ) -> Vec<f32> {
        let s = &self.shape;
        let (hq, d, g, sink) = (s.num_query_heads, s.head_dim, s.group_size(), s.sink);
        let len = pr.lens[b].max(0) as usize;
        let (q0, q1) = (qb * BLOCK, ((qb + 1) * BLOCK).min(len));
        let nq = q1 - q0;
        // The tile's queries in f32, times the scale: [G][rows][D].
        let mut qt = vec![0f32; g * nq * d];
        for x in 0..g {
            for r in 0..nq {
                let src = ((b * pr.p + q0 + r) * hq + j * g + x) * d;
                let dst = &mut qt[(x * nq + r) * d..(x * nq + r + 1) * d];
                widen(&q[src..src + d], self.dtype, dst);
                dst.iter_mut().for_each(|v| *v *= scale);
            }
        }
        let locals: Vec<usize> = (0..g).map(|x| s.query_local(j * g + x)).collect();
        let widest = locals.iter().copied().max().unwrap_or(0);
        // The first key the widest head sees from the tile's first query (the band).
        let band_lo = match mode {
            PrefillMode::Token => (q0 + 1).saturating_sub(widest),
            PrefillMode::Block64 => (qb + 1).saturating_sub(widest / BLOCK) * BLOCK,
        };
        let (sink_blocks, band_first) = (sink.min(q1).div_ceil(BLOCK), band_lo / BLOCK);
        let mut acc = Accum::new(g * nq, d);
        let mut sc = [0f32; BLOCK];
        for kb in (0..sink_blocks.min(band_first)).chain(band_first..=qb) {
            let (k0, span) = (kb * BLOCK, kb * BLOCK * d..(kb + 1) * BLOCK * d);
            let nk = (len - k0).min(BLOCK);
            let (kt, vb) = (&kv.kt[span.clone()], &kv.v[span]);
            for (x, &local) in locals.iter().enumerate() {
                let sees = |qp: usize, k: usize| match mode {
                    PrefillMode::Token => token_sees(qp, k, sink, local),
                    PrefillMode::Block64 => block64_sees(qp, k, sink, local),
                };
                let Some(partial) = prefill_block_kind(mode, (q0, q1), (k0, nk), sink, local, sees)
                else {
                    continue;
                };
                for r in 0..nq {
                    let i = x * nq + r;
                    block_scores(&qt[i * d..(i + 1) * d], kt, &mut sc);
                    mask_scores(&mut sc, nk, partial, |c| sees(q0 + r, k0 + c));
                    softmax_block(&mut sc, vb, nk, acc.row(i));
                }
            }
        }
        let mut o = vec![0f32; g * nq * d];
        for (i, oi) in o.chunks_exact_mut(d).enumerate() {
            acc.finish(i, oi);
        }
        o
    }

    /// The positions KV head `j`'s widest query head sees with `t` tokens held: the sink
    /// `0..sink_end`, then `lo..t`; and their count.
    fn decode_span(&self, t: usize, j: usize) -> (usize, usize, usize) {
        let s = &self.shape;
        let g = s.group_size();
        let widest = (0..g).map(|x| s.query_local(j * g + x)).max().unwrap_or(0);
        let sink_end = s.sink.min(t);
        let lo = t.saturating_sub(widest).max(sink_end);
        (sink_end, lo, sink_end + (t - lo))
    }

    /// Decode attention of the query heads of KV head `j` in row `b` over part of the
    /// compacted cache: the entries `range` of the positions the group sees (the sink
    /// slots, then the ring, which may wrap: at most three runs of contiguous slots), a
    /// block of at most BLOCK slots at a time widened to f32 once for all heads of the
    /// group; each head masks to its own window. Returns the heads' softmax states.
    fn decode_part(
        &self,
        q: &[u16],
        t: i32,
        scale: f32,
        (b, j): (usize, usize),
        range: std::ops::Range<usize>,
    ) -> Accum {
        let s = &self.shape;
        let (hq, d, g, sink) = (s.num_query_heads, s.head_dim, s.group_size(), s.sink);
        let (dtype, cache) = (self.dtype, &self.cache);
        let t = t.max(0) as usize;
        let cap = s.kv_capacity[j];
        let base = b * s.total_slots + s.kv_offset[j];
        let mut qt = vec![0f32; g * d];
        for (x, qx) in qt.chunks_exact_mut(d).enumerate() {
            let src = (b * hq + j * g + x) * d;
            widen(&q[src..src + d], dtype, qx);
            qx.iter_mut().for_each(|v| *v *= scale);
        }
        let locals: Vec<usize> = (0..g).map(|x| s.query_local(j * g + x)).collect();
        let (sink_end, lo, _) = self.decode_span(t, j);
        let mut krow = vec![0f32; BLOCK * d];
        let mut kt = vec![0f32; BLOCK * d];
        let mut vb = vec![0f32; BLOCK * d];
        let mut acc = Accum::new(g, d);
        let mut sc = [0f32; BLOCK];
        // Positions p0..p0+nk, held in slots slot0..slot0+nk.
        let mut block = |p0: usize, nk: usize, slot0: usize| {
            let rows = (base + slot0) * d..(base + slot0 + nk) * d;
            widen(&cache.k[rows.clone()], dtype, &mut krow[..nk * d]);
            // Rows past nk keep an earlier block's finite values (or zeros): their
            // scores are masked below.
            let mut transposed = false;
            widen(&cache.v[rows], dtype, &mut vb[..nk * d]);
            for (x, &local) in locals.iter().enumerate() {
                let sees = |pos: usize| decode_sees(t, sink, local, pos);
                let full = p0 + nk <= sink_end || p0 >= sink.max(t.saturating_sub(local));
                if !full && !(p0..p0 + nk).any(sees) {
                    continue;
                }
                let qx = &qt[x * d..(x + 1) * d];
                if block_scores_rows(qx, &krow, nk, &mut sc).is_none() {
                    if !transposed {
                        for (c, kr) in krow[..nk * d].chunks_exact(d).enumerate() {
                            for (i, &x) in kr.iter().enumerate() {
                                kt[i * BLOCK + c] = x;
                            }
                        }
                        transposed = true;
                    }
                    block_scores(qx, &kt, &mut sc);
                }
                mask_scores(&mut sc, nk, !full, |c| sees(p0 + c));
                softmax_block(&mut sc, &vb, nk, acc.row(x));
            }
        };
        // Entry i: position i in the sink, else position lo + i - sink_end in the ring.
        let mut i = range.start;
        while i < range.end {
            let (pos, slot, run) = if i < sink_end {
                (i, i, sink_end - i)
            } else {
                let pos = lo + i - sink_end;
                let slot = slot_of(pos, sink, cap);
                (pos, slot, cap - slot)
            };
            let nk = run.min(range.end - i).min(BLOCK);
            block(pos, nk, slot);
            i += nk;
        }
        acc
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
        let dtype = self.dtype;
        // K and V of every (row, KV head) in f32, once per call, blocked for the tiles.
        let kv: Vec<PromptKv> = (0..pr.lens.len() * hkv)
            .into_par_iter()
            .map(|t| PromptKv::new(pr, dtype, hkv, d, t / hkv, t % hkv))
            .collect();
        // One task per (row, KV head, block of query positions) within the row's length.
        let tiles: Vec<(usize, usize, usize)> = pr
            .lens
            .iter()
            .enumerate()
            .flat_map(|(b, &len)| {
                let blocks = (len.max(0) as usize).div_ceil(BLOCK);
                (0..blocks).flat_map(move |qb| (0..hkv).map(move |j| (b, j, qb)))
            })
            .collect();
        let done: Vec<Vec<f32>> = tiles
            .par_iter()
            .map(|&(b, j, qb)| self.prefill_tile(q, pr, &kv[b * hkv + j], mode, scale, (b, j, qb)))
            .collect();
        // Padding rows stay zero.
        let mut out = vec![0f32; q.len()];
        for (&(b, j, qb), o) in tiles.iter().zip(&done) {
            let nq = o.len() / (g * d);
            for x in 0..g {
                for r in 0..nq {
                    let dst = ((b * p + qb * BLOCK + r) * hq + j * g + x) * d;
                    let src = (x * nq + r) * d;
                    out[dst..dst + d].copy_from_slice(&o[src..src + d]);
                }
            }
        }
        round_to(&mut out, dtype);
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
        // Tasks: (row, KV head, part of the positions it shows), parts of PART_BLOCKS
        // blocks so that a few pairs with long windows still keep every thread busy; the
        // parts' softmaxes are merged afterwards. The cut depends on nothing but the
        // window (not the batch, not the thread count): a row's output is the same
        // whatever rows it is batched with, on any machine.
        let pairs = b_ * hkv;
        let mut tasks = Vec::new();
        let mut first = Vec::with_capacity(pairs + 1);
        for pair in 0..pairs {
            let (b, j) = (pair / hkv, pair % hkv);
            let (_, _, n) = self.decode_span(seq_lens[b].max(0) as usize, j);
            first.push(tasks.len());
            let mut a = 0;
            while a < n {
                tasks.push((b, j, a..(a + PART_BLOCKS * BLOCK).min(n)));
                a += PART_BLOCKS * BLOCK;
            }
        }
        first.push(tasks.len());
        let parts: Vec<Accum> = tasks
            .par_iter()
            .map(|(b, j, range)| self.decode_part(q, seq_lens[*b], scale, (*b, *j), range.clone()))
            .collect();
        let mut out = vec![0f32; q.len()];
        // A pair's query heads are contiguous in out. The merge is a few multiply-adds
        // per output: on this thread (a parallel pass would cost a wake-up of the pool
        // per layer and step, more than the work).
        for (pair, o) in out.chunks_mut((g * d).max(1)).enumerate() {
            let mine = &parts[first[pair]..first[pair + 1]];
            for (x, ox) in o.chunks_exact_mut(d).enumerate() {
                Accum::merge(mine, x, ox);
            }
        }
        round_to(&mut out, self.dtype);
        Ok(out)
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        Ok(self.cache.clone())
    }
}
