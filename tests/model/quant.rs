//! moac's quantized matrix products (`moac_model::quant`) on fresh random inputs:
//! - the blocks read from candle's quantizer dequantize to exactly candle's f32 values
//!   (Q4_0, Q4_1, Q8_0);
//! - activation rounding stays within half a step of its block's scale;
//! - every dot-product kernel (the SIMD ones this CPU runs, one row and four, and the
//!   portable one) equals
//!   the float64 dot product of the dequantized weights and the rounded activations, to
//!   f32 summation error;
//! - a group product equals the float64 product of the dequantized weights and the
//!   exact inputs within the activation-rounding bound, for row counts that are and are
//!   not multiples of the 4-row kernel, one input row, a few, and more than a tile;
//! - from 32 input rows on, the product equals candle's f32 matmul of the dequantized
//!   weights;
//! - a matrix marked for wide inputs (the LM head) multiplies inputs rounded to 16
//!   bits: the float64 product within half a 16-bit step per input;
//! - bad shapes are errors.
#![allow(clippy::unwrap_used)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use moac_model::quant::{
    matmul_group, quantize_row, quantize_row_wide, Linear, QuantMatrix, BLOCK, QUANT_TYPES,
};
use moac_runtime::reference::check::Rng;

/// A random matrix with blocks of very different magnitudes, exact zeros and one
/// all-zero block, so scales span orders of magnitude.
fn matrix(rng: &mut Rng, rows: usize, cols: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(rows * cols);
    for b in 0..rows * cols / BLOCK {
        let scale = [1.0f32, 0.01, 30.0, 0.0][(rng.below(4) as usize + b) % 4];
        for _ in 0..BLOCK {
            let x = rng.uniform() * scale;
            v.push(if rng.below(20) == 0 { 0.0 } else { x });
        }
    }
    v
}

fn tensor(v: &[f32], rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(v.to_vec(), (rows, cols), &Device::Cpu).unwrap()
}

fn quantized(rng: &mut Rng, rows: usize, cols: usize, dtype: GgmlDType) -> QuantMatrix {
    let w = tensor(&matrix(rng, rows, cols), rows, cols);
    QuantMatrix::quantize(&w, dtype).unwrap()
}

fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

#[test]
fn blocks_dequantize_to_candles_values() {
    let mut rng = Rng::fresh("dequantize");
    for dtype in QUANT_TYPES {
        let (rows, cols) = (37, 96);
        let w = tensor(&matrix(&mut rng, rows, cols), rows, cols);
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
        assert_eq!(
            (ours.rows(), ours.cols(), ours.dtype()),
            (rows, cols, dtype)
        );
        assert_eq!(ours.bytes(), q.storage_size_in_bytes());
        let a = rows_of(&ours.dequantize().unwrap());
        let b = rows_of(&q.dequantize(&Device::Cpu).unwrap());
        assert_eq!(a, b, "{dtype:?}");
    }
    // Types the kernels do not run are left to candle.
    let w = tensor(&matrix(&mut rng, 4, 256), 4, 256);
    let k = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    assert!(QuantMatrix::from_qtensor(&k).unwrap().is_none());
}

/// One rounded block against its inputs: the scale is the largest |x| over `max`, each
/// integer within `max` and within half a step of its input (plus what f32 arithmetic
/// adds to `x * (1 / d)` before it is rounded: two roundings of relative 2^-24, up to
/// 0.004 of a step at 32767, so an input 0.4985 steps past an integer may round either
/// way), the stored sum `s` is `d` times the integers' sum, and a block that is not all
/// zeros reaches `max`.
fn check_rounded(chunk: &[f32], d: f32, s: f32, qs: &[i32], max: i32) {
    let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
    assert_eq!(d, amax / max as f32);
    for (&q, &v) in qs.iter().zip(chunk) {
        assert!(q.abs() <= max);
        let err = (v as f64 - d as f64 * q as f64).abs();
        let f32_slack = q.unsigned_abs() as f64 * 2f64.powi(-22);
        assert!(
            err <= d as f64 * (0.5 + f32_slack),
            "{v} rounded to {q} x {d}"
        );
    }
    assert_eq!(s, d * qs.iter().sum::<i32>() as f32);
    if amax > 0.0 {
        assert_eq!(qs.iter().map(|q| q.abs()).max(), Some(max));
    } else {
        assert!(qs.iter().all(|&q| q == 0));
    }
}

#[test]
fn activation_rounding_is_within_half_a_step() {
    let mut rng = Rng::fresh("activations");
    let x = matrix(&mut rng, 8, 128);
    let mut blocks = Vec::new();
    quantize_row(&x, &mut blocks);
    assert_eq!(blocks.len(), x.len() / BLOCK);
    for (b, chunk) in blocks.iter().zip(x.chunks(BLOCK)) {
        let qs: Vec<i32> = b.qs.iter().map(|&q| q as i32).collect();
        check_rounded(chunk, b.d, b.s, &qs, 127);
    }
}

#[test]
fn kernels_equal_the_float64_dot_of_the_rounded_inputs() {
    let mut rng = Rng::fresh("kernels");
    for dtype in QUANT_TYPES {
        for cols in [64, 576, 1536] {
            let rows = 9;
            let q = quantized(&mut rng, rows, cols, dtype);
            let w = rows_of(&q.dequantize().unwrap());
            let x = matrix(&mut rng, 1, cols);
            let mut act = Vec::new();
            quantize_row(&x, &mut act);
            let xr: Vec<f64> = act
                .iter()
                .flat_map(|b| b.qs.iter().map(move |&v| b.d as f64 * v as f64))
                .collect();
            for (r, wr) in w.iter().enumerate() {
                let exact: f64 = wr.iter().zip(&xr).map(|(&a, b)| a as f64 * b).sum();
                let mag: f64 = wr.iter().zip(&xr).map(|(&a, b)| (a as f64 * b).abs()).sum();
                let four = q.dot_four_rows(r.min(rows - 4), &act)[r - r.min(rows - 4)];
                for (kernel, got) in [
                    ("simd", q.dot_row(r, &act)),
                    ("four rows", four),
                    ("portable", q.dot_portable(r, &act)),
                ] {
                    let err = (got as f64 - exact).abs();
                    // f32 sums over `cols` terms: a few ulps of the magnitude.
                    assert!(
                        err <= 1e-5 * mag + 1e-30,
                        "{dtype:?} cols {cols} row {r} {kernel}: {got} vs {exact} (magnitude {mag})"
                    );
                }
            }
        }
    }
}

#[test]
fn group_products_are_within_the_activation_rounding_bound() {
    let mut rng = Rng::fresh("group");
    let cols = 192;
    for dtype in QUANT_TYPES {
        // Row counts: a multiple of 4, a remainder of 1 and of 3 (the 4-row kernel's tail).
        let ms = [
            quantized(&mut rng, 64, cols, dtype),
            quantized(&mut rng, 37, cols, dtype),
            quantized(&mut rng, 7, cols, dtype),
        ];
        let refs: Vec<&QuantMatrix> = ms.iter().collect();
        let ws: Vec<Vec<Vec<f32>>> = ms
            .iter()
            .map(|m| rows_of(&m.dequantize().unwrap()))
            .collect();
        for m in [1usize, 3, 70] {
            let x = matrix(&mut rng, m, cols);
            let ys = matmul_group(&refs, &x, m).unwrap();
            for (i, (y, w)) in ys.iter().zip(&ws).enumerate() {
                assert_eq!(y.len(), m * w.len());
                for t in 0..m {
                    let xt = &x[t * cols..(t + 1) * cols];
                    let mut act = Vec::new();
                    quantize_row(xt, &mut act);
                    for (r, wr) in w.iter().enumerate() {
                        let exact: f64 =
                            wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                        // Each activation moves by at most half its block's step.
                        let bound: f64 = wr
                            .iter()
                            .enumerate()
                            .map(|(j, &a)| (a as f64).abs() * act[j / BLOCK].d as f64 * 0.5)
                            .sum();
                        let mag: f64 = wr
                            .iter()
                            .zip(xt)
                            .map(|(&a, &b)| (a as f64 * b as f64).abs())
                            .sum();
                        let got = y[t * w.len() + r] as f64;
                        assert!(
                            (got - exact).abs() <= bound * (1.0 + 1e-4) + 1e-5 * mag + 1e-30,
                            "{dtype:?} matrix {i} input {t} row {r}: {got} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn many_input_rows_run_the_dequantized_f32_product() {
    let mut rng = Rng::fresh("prefill rows");
    let (rows, cols, m) = (40, 96, 33);
    for dtype in QUANT_TYPES {
        let q = quantized(&mut rng, rows, cols, dtype);
        let w = q.dequantize().unwrap();
        let x = tensor(&matrix(&mut rng, m, cols), m, cols);
        let got = rows_of(&Linear::Quant(q).forward(&x).unwrap());
        let want = rows_of(&x.matmul(&w.t().unwrap()).unwrap());
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut rng = Rng::fresh("bad shapes");
    let a = quantized(&mut rng, 8, 64, GgmlDType::Q8_0);
    let b = quantized(&mut rng, 8, 96, GgmlDType::Q8_0);
    let x = vec![0f32; 64];
    assert!(matmul_group(&[&a, &b], &x, 1).is_err());
    assert!(matmul_group(&[&a], &x, 2).is_err());
    assert!(matmul_group(&[], &x, 1).unwrap().is_empty());
    let three = QTensor::quantize(
        &Tensor::zeros((2, 2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    assert!(QuantMatrix::from_qtensor(&three).is_err());
}

#[test]
fn wide_input_products_are_within_the_16_bit_rounding_bound() {
    let mut rng = Rng::fresh("wide inputs");
    let (rows, cols, m) = (13, 160, 2);
    for dtype in QUANT_TYPES {
        let q = quantized(&mut rng, rows, cols, dtype).with_wide_inputs();
        assert!(q.wide_inputs());
        let w = rows_of(&q.dequantize().unwrap());
        let x = matrix(&mut rng, m, cols);
        let y = matmul_group(&[&q], &x, m).unwrap().remove(0);
        for t in 0..m {
            let xt = &x[t * cols..(t + 1) * cols];
            // The f32-input kernel (what runs without AVX2): exact inputs.
            for (r, wr) in w.iter().enumerate() {
                let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let got = q.dot_float(r, xt) as f64;
                assert!(
                    (got - exact).abs() <= 1e-5 * mag + 1e-30,
                    "{dtype:?} f32 inputs row {r}"
                );
            }
            let mut wide = Vec::new();
            quantize_row_wide(xt, &mut wide);
            for (r, wr) in w.iter().enumerate() {
                let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wr
                    .iter()
                    .zip(xt)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                // Half a 16-bit step per input (0 where the kernel takes f32 inputs).
                let bound: f64 = wr
                    .iter()
                    .enumerate()
                    .map(|(j, &a)| (a as f64).abs() * wide[j / BLOCK].d as f64 * 0.5)
                    .sum();
                let got = y[t * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= bound * (1.0 + 1e-4) + 1e-5 * mag + 1e-30,
                    "{dtype:?} input {t} row {r}: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn wide_rounding_is_within_half_a_step() {
    let mut rng = Rng::fresh("wide activations");
    let x = matrix(&mut rng, 4, 128);
    let mut blocks = Vec::new();
    quantize_row_wide(&x, &mut blocks);
    assert_eq!(blocks.len(), x.len() / BLOCK);
    for (b, chunk) in blocks.iter().zip(x.chunks(BLOCK)) {
        let qs: Vec<i32> = b.qs.iter().map(|&q| q as i32).collect();
        check_rounded(chunk, b.d, b.s, &qs, 32767);
    }
}

#[test]
fn embedding_rows_are_the_dequantized_rows() {
    let mut rng = Rng::fresh("embedding rows");
    for dtype in QUANT_TYPES {
        let q = quantized(&mut rng, 20, 64, dtype);
        let w = rows_of(&q.dequantize().unwrap());
        let ids = [3u32, 0, 19, 3];
        let got = q.rows_f32(&ids).unwrap();
        let want: Vec<f32> = ids.iter().flat_map(|&i| w[i as usize].clone()).collect();
        assert_eq!(got, want);
        assert!(q.rows_f32(&[20]).is_err());
        let lin = Linear::Quant(q.clone());
        assert_eq!(lin.rows_f32(&ids).unwrap(), want);
        // The wide-input copy (a tied LM head) shares the blocks.
        let head = Linear::Quant(q.with_wide_inputs());
        assert!(head.shares_storage(&lin));
        assert!(!head.shares_storage(&Linear::Quant(quantized(&mut rng, 20, 64, dtype))));
    }
}

#[test]
fn a_long_prompt_runs_its_mlp_in_chunks_with_the_same_rows() {
    use moac_model::attention::DenseReference;
    use moac_model::llama::{Llama, LlamaConfig, RopeStyle};
    // 1100 tokens: the MLP takes rows 0..512, 512..1024 and 1024..1100 in turn. A row's
    // hidden state must not depend on how the rows were cut: row 1050 of the 1100-token
    // prompt against the same row of a 1051-token prompt (other chunk ends), and row
    // 700 against a 701-token prompt.
    let config = LlamaConfig {
        num_layers: 2,
        hidden: 64,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 32,
        vocab_size: 97,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        context_len: 2048,
        rope: RopeStyle::HalfSplit,
    };
    let model = Llama::random(config, 96, 3).unwrap();
    let mut rng = Rng::fresh("chunked mlp");
    let tokens: Vec<u32> = (0..1100).map(|_| rng.below(97) as u32).collect();
    let hidden = |n: usize| -> Vec<Vec<f32>> {
        let mut attn = DenseReference::new(1, n);
        let h = model.prefill(&mut attn, &[&tokens[..n]]).unwrap();
        h.get(0).unwrap().to_vec2::<f32>().unwrap()
    };
    let full = hidden(1100);
    for row in [1050usize, 700] {
        let part = hidden(row + 1);
        for (a, b) in full[row].iter().zip(&part[row]) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "row {row}: {a} vs {b}"
            );
        }
    }
}
