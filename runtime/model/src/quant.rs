//! Matrix products straight from GGUF's quantized blocks on the CPU.
//!
//! A weight matrix of Q4_0, Q4_1 or Q8_0 blocks (32 weights a block, one f16 scale, Q4_1
//! also an f16 offset) is kept exactly as the file holds it. A product rounds the
//! activations to 8 bits once per input row, in blocks of 32 with an f32 scale (the sum
//! of the block's rounded values is kept for Q4_1's offset), then every output is a sum
//! over blocks of `scale_w * scale_x * (integer dot product)`, the integer part exact.
//! The only rounding beyond the weights' own is the activations' (at most half a step
//! of their block's scale per value) and the f32 sums.
//!
//! A matrix marked for wide inputs (the LM head) rounds them to 16 bits instead, about
//! 250 times finer, so near-tied logits do not flip. From [`DEQUANTIZED_ROWS`] input
//! rows on (a prompt) the products are compute-bound and candle's f32 GEMM outruns the
//! 8-bit kernels: the matrix is dequantized for the call and multiplied in f32.
//!
//! Work runs on rayon's pool, split over chunks of output rows; matrices that read the
//! same input (Q, K and V; gate and up) run as one group so the input is quantized once
//! and the threads meet once. A decode step reads every weight once: for SmolLM2's Q4_1
//! file that is about 0.63 bytes a weight, against 4 for f32. The kernels: AVX2 where
//! the CPU has it (checked at run time), portable loops the compiler vectorizes
//! elsewhere.

// The lane loops index by lane on purpose: the indices are what the vectorizer maps.
#![allow(clippy::needless_range_loop)]

use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Weights (and activations) a block holds.
pub const BLOCK: usize = 32;

/// One block of quantized activations: `qs[i] * d` approximates the input; `s` is
/// `d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
pub struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; BLOCK],
}

/// One block of activations rounded to 16 bits: `qs[i] * d`; `s` is `d * sum(qs)`.
#[derive(Clone, Copy, Debug)]
pub struct WideBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i16; BLOCK],
}

/// Q4_0: `d * (q - 8)`, q the 4-bit value (low nibbles are weights 0..16, high 16..32).
#[derive(Clone, Copy, Debug)]
struct Q40 {
    d: f16,
    qs: [u8; BLOCK / 2],
}

/// Q4_1: `d * q + m`.
#[derive(Clone, Copy, Debug)]
struct Q41 {
    d: f16,
    m: f16,
    qs: [u8; BLOCK / 2],
}

/// The two 4-bit block types to the SIMD kernels: the same unsigned nibbles times the
/// input's bytes, and a constant term per block that differs (Q4_1's minimum, Q4_0's
/// `-8 d`, each times the input block's sum).
trait FourBit {
    fn nibbles(&self) -> &[u8; BLOCK / 2];
    fn scale(&self) -> f32;
    /// The block's constant term against an input block whose values sum to `s`.
    fn offset(&self, s: f32) -> f32;
}

impl FourBit for Q41 {
    fn nibbles(&self) -> &[u8; BLOCK / 2] {
        &self.qs
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    #[inline(always)]
    fn offset(&self, s: f32) -> f32 {
        self.m.to_f32() * s
    }
}

impl FourBit for Q40 {
    fn nibbles(&self) -> &[u8; BLOCK / 2] {
        &self.qs
    }
    fn scale(&self) -> f32 {
        self.d.to_f32()
    }
    #[inline(always)]
    fn offset(&self, s: f32) -> f32 {
        -8.0 * self.d.to_f32() * s
    }
}

/// Q8_0: `d * q`.
#[derive(Clone, Copy, Debug)]
struct Q80 {
    d: f16,
    qs: [i8; BLOCK],
}

#[derive(Clone, Debug)]
enum Blocks {
    Q4_0(Vec<Q40>),
    Q4_1(Vec<Q41>),
    Q8_0(Vec<Q80>),
}

/// A row-major matrix of quantized blocks: row r is blocks `r * cols / 32 ..`.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    /// Shared: a tied embedding and LM head hold one copy.
    blocks: Arc<Blocks>,
    /// Multiply with inputs rounded to 16 bits, not 8 (the LM head: logits of
    /// near-tied tokens must not flip on the activations' rounding). 16-bit blocks
    /// keep 1/65534 of the block's largest value: about 250 times finer than 8 bits.
    wide_inputs: bool,
}

/// The block types [`QuantMatrix`] runs.
pub const QUANT_TYPES: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

fn f16_at(b: &[u8], i: usize) -> f16 {
    f16::from_le_bytes([b[i], b[i + 1]])
}

impl QuantMatrix {
    /// The matrix of a 2-d quantized tensor of a type in [`QUANT_TYPES`]; `None` for
    /// other types.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<QuantMatrix>> {
        let dims = t.shape().dims();
        let &[rows, cols] = dims else {
            return Err(Error::Usage(format!(
                "a quantized matrix must have 2 dimensions, not {dims:?}"
            )));
        };
        if !QUANT_TYPES.contains(&t.dtype()) {
            return Ok(None);
        }
        if cols % BLOCK != 0 {
            return Err(Error::Usage(format!(
                "a {:?} matrix's rows must be whole blocks of {BLOCK}, not {cols} long",
                t.dtype()
            )));
        }
        let data = t.data()?;
        let n = rows * cols / BLOCK;
        let size = t.dtype().type_size();
        if data.len() != n * size {
            return Err(Error::Usage(format!(
                "a {:?} matrix of {rows} x {cols} takes {} bytes, found {}",
                t.dtype(),
                n * size,
                data.len()
            )));
        }
        let chunks = data.chunks_exact(size);
        let blocks = match t.dtype() {
            GgmlDType::Q4_0 => Blocks::Q4_0(
                chunks
                    .map(|b| {
                        let mut qs = [0u8; BLOCK / 2];
                        qs.copy_from_slice(&b[2..18]);
                        Q40 {
                            d: f16_at(b, 0),
                            qs,
                        }
                    })
                    .collect(),
            ),
            GgmlDType::Q4_1 => Blocks::Q4_1(
                chunks
                    .map(|b| {
                        let mut qs = [0u8; BLOCK / 2];
                        qs.copy_from_slice(&b[4..20]);
                        Q41 {
                            d: f16_at(b, 0),
                            m: f16_at(b, 2),
                            qs,
                        }
                    })
                    .collect(),
            ),
            _ => Blocks::Q8_0(
                chunks
                    .map(|b| {
                        let mut qs = [0i8; BLOCK];
                        for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
                            *q = byte as i8;
                        }
                        Q80 {
                            d: f16_at(b, 0),
                            qs,
                        }
                    })
                    .collect(),
            ),
        };
        Ok(Some(QuantMatrix {
            rows,
            cols,
            blocks: Arc::new(blocks),
            wide_inputs: false,
        }))
    }

    /// Quantizes an f32 matrix [rows, cols] to `dtype` (one of [`QUANT_TYPES`]).
    pub fn quantize(w: &Tensor, dtype: GgmlDType) -> Result<QuantMatrix> {
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?;
        QuantMatrix::from_qtensor(&q)?
            .ok_or_else(|| Error::Usage(format!("moac's quantized products do not run {dtype:?}")))
    }

    /// The same matrix multiplied with inputs rounded to 16-bit blocks (x86 with AVX2;
    /// elsewhere the f32 inputs as they are, each weight converted to f32).
    pub fn with_wide_inputs(mut self) -> QuantMatrix {
        self.wide_inputs = true;
        self
    }

    pub fn wide_inputs(&self) -> bool {
        self.wide_inputs
    }

    /// Row `r` times one row of 16-bit input blocks.
    #[cfg(target_arch = "x86_64")]
    fn dot_wide(&self, r: usize, x: &[WideBlock]) -> f32 {
        let per = self.cols / BLOCK;
        let range = r * per..(r + 1) * per;
        // SAFETY: called only where `avx2::available()` holds (see `matmul_group`):
        // the CPU runs AVX2 and FMA, the kernels' only features.
        unsafe {
            match &*self.blocks {
                Blocks::Q4_0(bs) => avx2::wide_q4(&bs[range], x),
                Blocks::Q4_1(bs) => avx2::wide_q4(&bs[range], x),
                Blocks::Q8_0(bs) => avx2::wide_q8_0(&bs[range], x),
            }
        }
    }

    /// Row `r` times an f32 input row (`cols` long).
    pub fn dot_float(&self, r: usize, x: &[f32]) -> f32 {
        let per = self.cols / BLOCK;
        let range = r * per..(r + 1) * per;
        let xs = x.chunks_exact(BLOCK);
        let mut acc = [0f32; 8];
        match &*self.blocks {
            Blocks::Q8_0(bs) => {
                for (b, xb) in bs[range].iter().zip(xs) {
                    let mut w = [0f32; BLOCK];
                    for (f, &q) in w.iter_mut().zip(&b.qs) {
                        *f = q as f32;
                    }
                    float_block(&mut acc, b.d.to_f32(), 0.0, &w, xb);
                }
            }
            Blocks::Q4_1(bs) => {
                for (b, xb) in bs[range].iter().zip(xs) {
                    float_block(
                        &mut acc,
                        b.d.to_f32(),
                        b.m.to_f32(),
                        &nibbles_f32(&b.qs, 0.0),
                        xb,
                    );
                }
            }
            Blocks::Q4_0(bs) => {
                for (b, xb) in bs[range].iter().zip(xs) {
                    float_block(&mut acc, b.d.to_f32(), 0.0, &nibbles_f32(&b.qs, 8.0), xb);
                }
            }
        }
        acc.iter().sum()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> GgmlDType {
        match *self.blocks {
            Blocks::Q4_0(_) => GgmlDType::Q4_0,
            Blocks::Q4_1(_) => GgmlDType::Q4_1,
            Blocks::Q8_0(_) => GgmlDType::Q8_0,
        }
    }

    /// Bytes of the blocks as the file holds them.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols / BLOCK * self.dtype().type_size()
    }

    /// The weights in f32 [rows, cols], block by block as the format defines them.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        self.dequantize_blocks(0..self.rows * self.cols / BLOCK, &mut out);
        Ok(Tensor::from_vec(out, (self.rows, self.cols), &Device::Cpu)?)
    }

    /// Rows `ids` in f32, one after another (an embedding lookup); an id past the rows
    /// is an error.
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let per = self.cols / BLOCK;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let r = id as usize;
            if r >= self.rows {
                return Err(Error::Usage(format!(
                    "row {r} of a matrix of {} rows",
                    self.rows
                )));
            }
            self.dequantize_blocks(r * per..(r + 1) * per, &mut out);
        }
        Ok(out)
    }

    /// Whether `other` holds the same blocks (a tied embedding and LM head).
    pub fn shares_blocks(&self, other: &QuantMatrix) -> bool {
        Arc::ptr_eq(&self.blocks, &other.blocks)
    }

    fn dequantize_blocks(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        match &*self.blocks {
            Blocks::Q4_0(bs) => {
                for b in &bs[range] {
                    let d = b.d.to_f32();
                    out.extend(b.qs.iter().map(|&q| d * ((q & 15) as f32 - 8.0)));
                    out.extend(b.qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
                }
            }
            Blocks::Q4_1(bs) => {
                for b in &bs[range] {
                    let (d, m) = (b.d.to_f32(), b.m.to_f32());
                    out.extend(b.qs.iter().map(|&q| d * (q & 15) as f32 + m));
                    out.extend(b.qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
            Blocks::Q8_0(bs) => {
                for b in &bs[range] {
                    let d = b.d.to_f32();
                    out.extend(b.qs.iter().map(|&q| d * q as f32));
                }
            }
        }
    }

    /// The dot product of row `r` with one quantized input row.
    #[inline]
    fn dot(&self, r: usize, x: &[ActBlock]) -> f32 {
        let per = self.cols / BLOCK;
        let range = r * per..(r + 1) * per;
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: `available` checked that this CPU runs AVX2 and FMA, the only
            // features the kernels are compiled for.
            return unsafe {
                match &*self.blocks {
                    Blocks::Q4_0(bs) => avx2::dot_q4(&bs[range], x),
                    Blocks::Q4_1(bs) => avx2::dot_q4(&bs[range], x),
                    Blocks::Q8_0(bs) => avx2::dot_q8_0(&bs[range], x),
                }
            };
        }
        match &*self.blocks {
            Blocks::Q4_0(bs) => dot_q4_0(&bs[range], x),
            Blocks::Q4_1(bs) => dot_q4_1(&bs[range], x),
            Blocks::Q8_0(bs) => dot_q8_0(&bs[range], x),
        }
    }

    /// Rows `r..r + 4` against one quantized input row.
    #[inline]
    fn dot4(&self, r: usize, x: &[ActBlock]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let per = self.cols / BLOCK;
            let row = |i: usize| (r + i) * per..(r + i + 1) * per;
            // SAFETY: `available` checked that this CPU runs AVX2 and FMA, the only
            // features the kernels are compiled for.
            return unsafe {
                match &*self.blocks {
                    Blocks::Q4_0(bs) => avx2::dot4_q4_0([0, 1, 2, 3].map(|i| &bs[row(i)]), x),
                    Blocks::Q4_1(bs) => avx2::dot4_q4_1([0, 1, 2, 3].map(|i| &bs[row(i)]), x),
                    Blocks::Q8_0(bs) => avx2::dot4_q8_0([0, 1, 2, 3].map(|i| &bs[row(i)]), x),
                }
            };
        }
        [0, 1, 2, 3].map(|i| self.dot(r + i, x))
    }

    /// The dot products of row `r` with one quantized input row, by the portable
    /// kernels (whatever the CPU): what tests compare the SIMD kernels with.
    pub fn dot_portable(&self, r: usize, x: &[ActBlock]) -> f32 {
        let per = self.cols / BLOCK;
        let range = r * per..(r + 1) * per;
        match &*self.blocks {
            Blocks::Q4_0(bs) => dot_q4_0(&bs[range], x),
            Blocks::Q4_1(bs) => dot_q4_1(&bs[range], x),
            Blocks::Q8_0(bs) => dot_q8_0(&bs[range], x),
        }
    }

    /// The dot product of row `r` with one quantized input row, by the kernel
    /// products use on this CPU.
    pub fn dot_row(&self, r: usize, x: &[ActBlock]) -> f32 {
        self.dot(r, x)
    }

    /// Rows `r..r + 4` against one quantized input row, by the four-row kernel
    /// products use on this CPU (`r + 4 <= rows`).
    pub fn dot_four_rows(&self, r: usize, x: &[ActBlock]) -> [f32; 4] {
        self.dot4(r, x)
    }
}

/// The x86-64 kernels: AVX2 byte products (`maddubs`: unsigned weights times signed
/// activations, pairs summed to 16 bits, then to 32), one f32 fused multiply-add per
/// block with the product of the scales.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ActBlock, FourBit, WideBlock, Q40, Q41, Q80};
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    pub fn available() -> bool {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    fn load32(b: &[i8; 32]) -> __m256i {
        // SAFETY: an unaligned load of exactly the 32 bytes of `b`.
        unsafe { _mm256_loadu_si256(b.as_ptr() as *const __m256i) }
    }

    /// 16 bytes of nibbles as 32 bytes: the low nibbles, then the high ones.
    #[target_feature(enable = "avx2,fma")]
    fn nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: an unaligned load of exactly the 16 bytes of `qs`.
        let b = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(b, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Sum over blocks of scale * (integer products), the integers from `maddubs`.
    #[target_feature(enable = "avx2,fma")]
    fn block_sum(acc: __m256, unsigned: __m256i, signed: __m256i, scale: f32) -> __m256 {
        let p16 = _mm256_maddubs_epi16(unsigned, signed);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p32), acc)
    }

    /// Q4_1 or Q4_0 (as unsigned nibbles minus 8: the 8 comes off through the
    /// activations' sums, in the block's constant term).
    #[target_feature(enable = "avx2,fma")]
    pub fn dot_q4<B: FourBit>(w: &[B], x: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (b, a) in w.iter().zip(x) {
            acc = block_sum(acc, nibbles(b.nibbles()), load32(&a.qs), b.scale() * a.d);
            offset += b.offset(a.s);
        }
        hsum(acc) + offset
    }

    /// Four rows at once, `$name(rows, x) -> [f32; 4]`: each activation block is loaded
    /// once for the four rows, and the four independent accumulators keep more weight
    /// loads in flight than one row's dependency chain allows. `$pair(b, xv)` gives
    /// the (unsigned, signed) byte vectors of a block against the activations `xv`,
    /// `$offset(b, a)` the block's scalar term.
    macro_rules! four_rows {
        ($name:ident, $ty:ty, $pair:expr, $offset:expr) => {
            #[target_feature(enable = "avx2,fma")]
            pub fn $name(w: [&[$ty]; 4], x: &[ActBlock]) -> [f32; 4] {
                let n = x.len();
                let w = w.map(|r| &r[..n]);
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut offset = [0f32; 4];
                for (i, a) in x.iter().enumerate() {
                    let xv = load32(&a.qs);
                    for r in 0..4 {
                        let b = &w[r][i];
                        let (u, sv) = $pair(b, xv);
                        acc[r] = block_sum(acc[r], u, sv, b.d.to_f32() * a.d);
                        offset[r] += $offset(b, a);
                    }
                }
                [0, 1, 2, 3].map(|r| hsum(acc[r]) + offset[r])
            }
        };
    }

    four_rows!(
        dot4_q4_1,
        Q41,
        |b: &Q41, xv| (nibbles(&b.qs), xv),
        |b: &Q41, a: &ActBlock| b.offset(a.s)
    );
    four_rows!(
        dot4_q4_0,
        Q40,
        |b: &Q40, xv| (nibbles(&b.qs), xv),
        |b: &Q40, a: &ActBlock| b.offset(a.s)
    );
    four_rows!(
        dot4_q8_0,
        Q80,
        |b: &Q80, xv| {
            let wv = load32(&b.qs);
            (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv))
        },
        |_: &Q80, _: &ActBlock| 0.0
    );

    /// Two halves of 16 i16 weights times a 16-bit input block: `madd` sums pairs
    /// into 32 bits (at most 4 x 127 x 32767 a lane: no overflow).
    #[target_feature(enable = "avx2,fma")]
    fn wide_sum(acc: __m256, lo: __m256i, hi: __m256i, a: &WideBlock, scale: f32) -> __m256 {
        // SAFETY: unaligned loads of exactly the 32 i16 (64 bytes) of `a.qs`.
        let (x0, x1) = unsafe {
            let p = a.qs.as_ptr() as *const __m256i;
            (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)))
        };
        let p = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
        _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn wide_q8_0(w: &[Q80], x: &[WideBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, a) in w.iter().zip(x) {
            let v = load32(&b.qs);
            let lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
            let hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
            acc = wide_sum(acc, lo, hi, a, b.d.to_f32() * a.d);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn wide_q4<B: FourBit>(w: &[B], x: &[WideBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (b, a) in w.iter().zip(x) {
            let v = nibbles(b.nibbles());
            let lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
            let hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
            acc = wide_sum(acc, lo, hi, a, b.scale() * a.d);
            offset += b.offset(a.s);
        }
        hsum(acc) + offset
    }

    /// Signed by signed: |w| times x with w's sign moved onto x.
    #[target_feature(enable = "avx2,fma")]
    pub fn dot_q8_0(w: &[Q80], x: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, a) in w.iter().zip(x) {
            let (wv, xv) = (load32(&b.qs), load32(&a.qs));
            let abs = _mm256_sign_epi8(wv, wv);
            let signed = _mm256_sign_epi8(xv, wv);
            acc = block_sum(acc, abs, signed, b.d.to_f32() * a.d);
        }
        hsum(acc)
    }
}

/// A block's 4-bit values as f32, less `minus`.
#[inline(always)]
fn nibbles_f32(qs: &[u8; BLOCK / 2], minus: f32) -> [f32; BLOCK] {
    let mut w = [0f32; BLOCK];
    for (i, &q) in qs.iter().enumerate() {
        w[i] = (q & 15) as f32 - minus;
        w[i + 16] = (q >> 4) as f32 - minus;
    }
    w
}

/// acc += scale * (w . x) + offset * sum(x) over one block, in eight lanes (lane j takes
/// elements j, j + 8, j + 16, j + 24) so the compiler vectorizes it.
#[inline(always)]
fn float_block(acc: &mut [f32; 8], scale: f32, offset: f32, w: &[f32; BLOCK], x: &[f32]) {
    let mut p = [0f32; 8];
    let mut sx = [0f32; 8];
    for k in 0..4 {
        for j in 0..8 {
            p[j] += w[k * 8 + j] * x[k * 8 + j];
            sx[j] += x[k * 8 + j];
        }
    }
    for j in 0..8 {
        acc[j] += scale * p[j] + offset * sx[j];
    }
}

/// Rounds one block to integers of magnitude at most `max` (`max` the block's largest
/// |x|): `put(i, q)` takes each; returns the scale and the integers' sum.
#[inline]
fn round_block(chunk: &[f32], max: f32, mut put: impl FnMut(usize, i32)) -> (f32, i32) {
    let amax = chunk.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / max;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, &v) in chunk.iter().enumerate() {
        // |v * inv| <= max (up to rounding of inv); the clamp keeps it in range.
        let r = (v * inv).round().clamp(-max, max) as i32;
        put(i, r);
        sum += r;
    }
    (d, sum)
}

/// Rounds one row of activations to 8-bit blocks (`x.len()` a multiple of 32).
pub fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    for chunk in x.chunks_exact(BLOCK) {
        let mut qs = [0i8; BLOCK];
        let (d, sum) = round_block(chunk, 127.0, |i, r| qs[i] = r as i8);
        out.push(ActBlock {
            d,
            s: d * sum as f32,
            qs,
        });
    }
}

/// Rounds one row of activations to 16-bit blocks (`x.len()` a multiple of 32).
pub fn quantize_row_wide(x: &[f32], out: &mut Vec<WideBlock>) {
    for chunk in x.chunks_exact(BLOCK) {
        let mut qs = [0i16; BLOCK];
        let (d, sum) = round_block(chunk, 32767.0, |i, r| qs[i] = r as i16);
        out.push(WideBlock {
            d,
            s: d * sum as f32,
            qs,
        });
    }
}

// The dot products keep eight f32 lanes (lane j sums the products of weights j, j + 8,
// j + 16 and j + 24 of each block, scaled by the block's scales) so that the compiler
// vectorizes them and the lanes are added only once per row.

#[inline]
fn dot_q8_0(w: &[Q80], x: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, a) in w.iter().zip(x) {
        let mut p = [0i32; 8];
        for k in 0..4 {
            for j in 0..8 {
                p[j] += b.qs[k * 8 + j] as i32 * a.qs[k * 8 + j] as i32;
            }
        }
        let s = b.d.to_f32() * a.d;
        for j in 0..8 {
            acc[j] += s * p[j] as f32;
        }
    }
    acc.iter().sum()
}

#[inline]
fn dot_q4_1(w: &[Q41], x: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    let mut offset = 0f32;
    for (b, a) in w.iter().zip(x) {
        let mut p = [0i32; 8];
        for k in 0..2 {
            for j in 0..8 {
                let q = b.qs[k * 8 + j];
                p[j] += (q & 15) as i32 * a.qs[k * 8 + j] as i32
                    + (q >> 4) as i32 * a.qs[16 + k * 8 + j] as i32;
            }
        }
        let s = b.d.to_f32() * a.d;
        for j in 0..8 {
            acc[j] += s * p[j] as f32;
        }
        offset += b.m.to_f32() * a.s;
    }
    acc.iter().sum::<f32>() + offset
}

#[inline]
fn dot_q4_0(w: &[Q40], x: &[ActBlock]) -> f32 {
    let mut acc = [0f32; 8];
    for (b, a) in w.iter().zip(x) {
        let mut p = [0i32; 8];
        for k in 0..2 {
            for j in 0..8 {
                let q = b.qs[k * 8 + j];
                p[j] += ((q & 15) as i32 - 8) * a.qs[k * 8 + j] as i32
                    + ((q >> 4) as i32 - 8) * a.qs[16 + k * 8 + j] as i32;
            }
        }
        let s = b.d.to_f32() * a.d;
        for j in 0..8 {
            acc[j] += s * p[j] as f32;
        }
    }
    acc.iter().sum()
}

/// Input rows a task multiplies with one chunk of weight rows before the next chunk:
/// the chunk stays in cache while these rows stream past.
const ROW_TILE: usize = 64;

/// y_i = x W_i^T for every matrix W_i of `ws` (all with `x`'s column count), x [m,
/// cols] row-major: one quantization of x, one parallel pass over all rows of all
/// matrices. Returns each product row-major [m, rows_i].
pub fn matmul_group(ws: &[&QuantMatrix], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
    let Some(first) = ws.first() else {
        return Ok(Vec::new());
    };
    let k = first.cols;
    if let Some(w) = ws.iter().find(|w| w.cols != k) {
        return Err(Error::Usage(format!(
            "matrices of one product group must have the same columns ({} and {})",
            k, w.cols
        )));
    }
    if x.len() != m * k {
        return Err(Error::Usage(format!(
            "an input of {} values is not {m} rows of {k}",
            x.len()
        )));
    }
    let per = k / BLOCK;
    let mut act = Vec::with_capacity(m * per);
    if ws.iter().any(|w| !w.wide_inputs) {
        for row in x.chunks_exact(k) {
            quantize_row(row, &mut act);
        }
    }
    #[cfg(target_arch = "x86_64")]
    let wide = {
        let mut wide = Vec::new();
        if avx2::available() && ws.iter().any(|w| w.wide_inputs) {
            wide.reserve(m * per);
            for row in x.chunks_exact(k) {
                quantize_row_wide(row, &mut wide);
            }
        }
        wide
    };
    // Chunks of output rows: enough to keep every thread busy, at least 16 rows.
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let threads = rayon::current_num_threads().max(1);
    let chunk = (total / (threads * 2)).clamp(16, 4096);
    let mut tasks = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let mut r = 0;
        while r < w.rows {
            let end = (r + chunk).min(w.rows);
            tasks.push((i, r, end));
            r = end;
        }
    }
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, r0, r1)| {
            let w = ws[i];
            let n = r1 - r0;
            let mut out = vec![0f32; m * n];
            if w.wide_inputs {
                for r in r0..r1 {
                    for t in 0..m {
                        #[cfg(target_arch = "x86_64")]
                        if !wide.is_empty() {
                            out[t * n + r - r0] = w.dot_wide(r, &wide[t * per..(t + 1) * per]);
                            continue;
                        }
                        out[t * n + r - r0] = w.dot_float(r, &x[t * k..(t + 1) * k]);
                    }
                }
                return out;
            }
            for t0 in (0..m).step_by(ROW_TILE) {
                let t1 = (t0 + ROW_TILE).min(m);
                let mut r = r0;
                while r + 4 <= r1 {
                    for t in t0..t1 {
                        let y = w.dot4(r, &act[t * per..(t + 1) * per]);
                        out[t * n + r - r0..t * n + r - r0 + 4].copy_from_slice(&y);
                    }
                    r += 4;
                }
                for r in r..r1 {
                    for t in t0..t1 {
                        out[t * n + r - r0] = w.dot(r, &act[t * per..(t + 1) * per]);
                    }
                }
            }
            out
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    for (&(i, r0, r1), part) in tasks.iter().zip(&parts) {
        let (rows, n) = (ws[i].rows, r1 - r0);
        for t in 0..m {
            outs[i][t * rows + r0..t * rows + r1].copy_from_slice(&part[t * n..(t + 1) * n]);
        }
    }
    Ok(outs)
}

/// From this many input rows on (a prefill), a quantized matrix is dequantized for the
/// call and multiplied in f32 by candle's matmul: the dequantization reads each weight
/// once per call, while the product is compute-bound and candle's f32 kernels outrun
/// the 8-bit ones here by about 2x (`cargo bench -p moac-model --bench quant`).
pub const DEQUANTIZED_ROWS: usize = 32;

/// A weight matrix of a model's linear layers: moac's quantized blocks, or whatever
/// candle holds (f32, f16, or block types moac's products do not run).
#[derive(Clone, Debug)]
pub enum Linear {
    Quant(QuantMatrix),
    Candle(QMatMul),
}

impl From<QMatMul> for Linear {
    fn from(m: QMatMul) -> Linear {
        Linear::Candle(m)
    }
}

impl Linear {
    /// x [.., cols] times the matrix's transpose: [.., rows].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(Linear::forward_group(&[self], x)?.remove(0))
    }

    /// The products of several matrices with one input; the quantized ones (all of
    /// them, with one column count) as one group.
    pub fn forward_group(ws: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let k = dims.last().copied().unwrap_or(0);
        let m = x.elem_count() / k.max(1);
        let flat: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let outs = Linear::forward_rows(ws, &flat, m)?;
        outs.into_iter()
            .zip(ws)
            .map(|(y, w)| {
                let mut shape = dims.clone();
                if let Some(last) = shape.last_mut() {
                    *last = w.rows()?;
                }
                Ok(Tensor::from_vec(y, shape, &Device::Cpu)?)
            })
            .collect()
    }

    /// [`Linear::forward_group`] on plain rows: x is `m` rows of the matrices' column
    /// count; returns each product [m, rows_i] row-major.
    pub fn forward_rows(ws: &[&Linear], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
        let quant: Option<Vec<&QuantMatrix>> = ws
            .iter()
            .map(|w| match w {
                Linear::Quant(q) => Some(q),
                Linear::Candle(_) => None,
            })
            .collect();
        match quant {
            Some(qs) if !qs.is_empty() && m < DEQUANTIZED_ROWS => matmul_group(&qs, x, m),
            _ => {
                let k = x.len() / m.max(1);
                let xt = Tensor::from_slice(x, (m, k), &Device::Cpu)?;
                ws.iter()
                    .map(|w| {
                        let y = match w {
                            Linear::Candle(c) => candle_core::Module::forward(c, &xt)?,
                            Linear::Quant(q) if m >= DEQUANTIZED_ROWS => {
                                let f = QMatMul::Tensor(q.dequantize()?);
                                candle_core::Module::forward(&f, &xt)?
                            }
                            Linear::Quant(q) => return Ok(matmul_group(&[q], x, m)?.remove(0)),
                        };
                        Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
                    })
                    .collect()
            }
        }
    }

    /// The matrix as products of `m` input rows run it: from [`DEQUANTIZED_ROWS`] rows
    /// on, a quantized matrix dequantized once (for a caller that runs several chunks
    /// of rows through it); otherwise itself.
    pub fn for_rows(&self, m: usize) -> Result<std::borrow::Cow<'_, Linear>> {
        Ok(match self {
            Linear::Quant(q) if m >= DEQUANTIZED_ROWS => {
                std::borrow::Cow::Owned(Linear::Candle(QMatMul::Tensor(q.dequantize()?)))
            }
            _ => std::borrow::Cow::Borrowed(self),
        })
    }

    /// Whether both are the same storage (a tied embedding and LM head).
    pub fn shares_storage(&self, other: &Linear) -> bool {
        match (self, other) {
            (Linear::Quant(a), Linear::Quant(b)) => a.shares_blocks(b),
            (Linear::Candle(QMatMul::Tensor(a)), Linear::Candle(QMatMul::Tensor(b))) => {
                a.id() == b.id()
            }
            _ => false,
        }
    }

    /// Rows `ids` of the matrix in f32, one after another (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Linear::Quant(q) => q.rows_f32(ids),
            other => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                Ok(other
                    .dense()?
                    .index_select(&ids, 0)?
                    .flatten_all()?
                    .to_vec1()?)
            }
        }
    }

    /// The matrix in f32 (quantized blocks dequantized).
    pub fn dense(&self) -> Result<Tensor> {
        Ok(match self {
            Linear::Quant(q) => q.dequantize()?,
            Linear::Candle(QMatMul::QTensor(q)) => q.dequantize(&Device::Cpu)?,
            Linear::Candle(QMatMul::Tensor(t)) => t.to_dtype(DType::F32)?,
            Linear::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> Result<usize> {
        Ok(match self {
            Linear::Quant(q) => q.rows,
            Linear::Candle(QMatMul::QTensor(q)) => q.shape().dims().first().copied().unwrap_or(0),
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
                t.dim(0)?
            }
        })
    }
}
