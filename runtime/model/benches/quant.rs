//! Quantized matrix products (moac's GGUF-block kernels) against candle's f32 matmul
//! over the same weights dequantized, side by side in one run, on SmolLM2-135M's
//! matrix shapes: one input row (a decode step) and 256 rows (a prefill chunk).
//! Prints milliseconds per product, the weight bytes each reads per second, and the
//! time ratio. The LM head also with 16-bit inputs (as the model runs it).
//!
//! cargo bench -p moac-model --bench quant

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use moac_model::quant::{Linear, QuantMatrix};
use std::time::Instant;

fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut rng = moac_runtime::reference::check::Rng::new(seed);
    let data: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 0.05).collect();
    Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("a random matrix")
}

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    best
}

fn main() {
    println!(
        "threads: {} (RAYON_NUM_THREADS)\n",
        rayon::current_num_threads()
    );
    println!("| matrix | type | rows in | moac ms | moac GB/s | f32 ms | f32 GB/s | time ratio |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let shapes = [
        ("q/k/v (960 x 576)", 960, 576),
        ("gate+up (3072 x 576)", 3072, 576),
        ("down (576 x 1536)", 576, 1536),
        ("lm head (49152 x 576)", 49152, 576),
    ];
    for (name, rows, cols) in shapes {
        let w = random(rows, cols, rows as u64 * 7 + cols as u64);
        let lm = rows > 10000;
        let mut kinds = vec![(GgmlDType::Q4_1, false), (GgmlDType::Q8_0, false)];
        if lm {
            kinds.push((GgmlDType::Q8_0, true));
        }
        for (dtype, float) in kinds {
            let q = QuantMatrix::quantize(&w, dtype).expect("quantized");
            let q = if float { q.with_wide_inputs() } else { q };
            let dtype = format!("{dtype:?}{}", if float { " 16-bit inputs" } else { "" });
            let wq = q.dequantize().expect("dequantized");
            let lin = Linear::Quant(q.clone());
            let dense = Linear::Candle(candle_core::quantized::QMatMul::Tensor(wq));
            for m in [1usize, 256] {
                if float && m > 1 {
                    continue;
                }
                let x = random(m, cols, 99 + m as u64);
                let reps = if m == 1 { 200 } else { 3 }.max(1);
                let reps = if rows > 10000 { reps / 10 + 1 } else { reps };
                let tq = time(reps, || {
                    lin.forward(&x).expect("moac product");
                });
                let tf = time(reps, || {
                    dense.forward(&x).expect("f32 product");
                });
                let (bq, bf) = (q.bytes() as f64, (rows * cols * 4) as f64);
                println!(
                    "| {name} | {dtype} | {m} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2} |",
                    tq * 1e3,
                    bq / tq / 1e9,
                    tf * 1e3,
                    bf / tf / 1e9,
                    tq / tf
                );
            }
        }
    }
}
