//! Every backend against the candle-core reference: the generated kernels on emu (and
//! on cuda where a GPU is present), and the cpu backend's own attention. One test body
//! per case, run per backend: prefill in both modes, fill (compared slot by slot, bit
//! for bit), append and decode over runs that wrap the rings, for GQA groups of 4 and 3
//! with different windows inside a group, MHA, head_dim 64 and 128, f16 and bf16,
//! ragged batches, t < sink and t == C.
#![allow(clippy::unwrap_used)]

use candle_core::{DType, Device, Tensor};
use moac::geometry::CacheGeometry;
use moac::ir::{KernelKind, LowerOptions, PrefillMode};
use moac::Dtype;
use moac_runtime::backend::cpu::candle_dtype;
use moac_runtime::backend::emu::{EmuModule, EmuOptions};
use moac_runtime::backend::{Backend, HostCache, LayerShape};
use moac_runtime::backend::{LayerBackend, Prompt};
use moac_runtime::BackendHandle;
use moac_runtime::{reference, Artifact};
use moac_test_support::*;

pub struct Case {
    pub name: &'static str,
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
    pub dtype: Dtype,
    pub rules: Vec<(f64, f64)>,
    pub prompt_lens: Vec<usize>,
    pub max_new: usize,
    pub steps: usize,
    pub fixed: bool,
    /// Decode query heads per CTA (0: the whole group).
    pub heads_per_cta: u32,
}

fn compare(name: &str, what: &str, got: &[f32], want: &[f32], dtype: Dtype) {
    let (atol, rtol) = tolerance(dtype);
    let mut worst = 0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let gv = g as f64;
        let err = (gv - w as f64).abs();
        assert!(
            err <= atol + rtol * (w as f64).abs(),
            "{name} {what}: element {i}: got {gv} vs reference {w} (|err| {err})"
        );
        worst = worst.max(err);
    }
    eprintln!(
        "{name} {what}: max abs error {worst:.2e} over {} elements",
        got.len()
    );
}

/// The backends every case runs on: cpu and emu, and cuda where a GPU is present.
fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Cpu, Backend::Emu];
    match moac_runtime::cuda_available() {
        Ok(()) => b.push(Backend::Cuda),
        Err(e) => eprintln!("not on cuda: {e}"),
    }
    b
}

fn run(case: &Case) {
    for backend in backends() {
        run_on(case, backend);
    }
}

fn run_on(case: &Case, backend: Backend) {
    let mut rng = Rng::fresh(&format!("{} on {backend}", case.name));
    let (hq, hkv, d, dtype) = (case.hq, case.hkv, case.d, case.dtype);
    let b_ = case.prompt_lens.len();
    let p_ = *case.prompt_lens.iter().max().unwrap();
    let plan = plan(hq, hkv, d, &case.rules);
    let geo = CacheGeometry::new(&plan, p_ as u64, case.max_new as u64).unwrap();
    let shape = LayerShape::new(&geo, 0);
    let mut opts = LowerOptions {
        dtype,
        fixed: case.fixed.then_some((p_ as u64, case.max_new as u64)),
        ..Default::default()
    };
    if case.heads_per_cta > 0 {
        let base = moac::ir::LaunchConfig::default_for(moac::ir::KernelKind::Decode, d);
        opts.launch_overrides.insert(
            "decode".into(),
            moac::ir::LaunchConfig {
                heads_per_cta: case.heads_per_cta,
                ..base
            },
        );
    }
    let art = Artifact::from_lowering(&plan, &opts).unwrap();
    let handle = BackendHandle::open(backend, EmuOptions::default()).unwrap();
    let mut emu: Box<dyn LayerBackend> = handle
        .open_layer(&art.layer_setup(&shape).unwrap(), b_)
        .unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    let dev = Device::Cpu;
    let bits = |x: &[f32]| x.iter().map(|&v| dtype.to_bits(v)).collect::<Vec<u16>>();
    let tensor = |x: &[f32], dims: &[usize]| {
        Tensor::from_vec(x.to_vec(), dims, &dev)
            .unwrap()
            .to_dtype(candle_dtype(dtype))
            .unwrap()
    };
    let lens_i32: Vec<i32> = case.prompt_lens.iter().map(|&l| l as i32).collect();

    let qp = round(&rng.vec(b_ * p_ * hq * d, 1.0), dtype);
    let kp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), dtype);
    let vp = round(&rng.vec(b_ * p_ * hkv * d, 1.0), dtype);
    let (q, k, v) = (
        tensor(&qp, &[b_, p_, hq, d]),
        tensor(&kp, &[b_, p_, hkv, d]),
        tensor(&vp, &[b_, p_, hkv, d]),
    );
    let (kb, vb) = (bits(&kp), bits(&vp));
    let prompt = Prompt {
        k: &kb,
        v: &vb,
        lens: &lens_i32,
        p: p_,
    };
    for mode in [PrefillMode::Block64, PrefillMode::Token] {
        let want = reference::prefill(&q, &k, &v, &case.prompt_lens, &shape, mode, scale).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = emu.prefill(&bits(&qp), &prompt, mode, scale).unwrap();
        compare(
            case.name,
            &format!("{backend} prefill {mode:?}"),
            &got,
            &want,
            dtype,
        );
    }

    emu.fill(&prompt).unwrap();
    let mut rcache = reference::fill(&k, &v, &case.prompt_lens, &shape).unwrap();
    check_cache(
        case.name,
        "fill",
        &emu.cache_to_host().unwrap(),
        &rcache,
        &shape,
        &case.prompt_lens,
        dtype,
    );

    for s in 0..case.steps {
        let lens: Vec<usize> = case.prompt_lens.iter().map(|&l| l + s + 1).collect();
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let qd = round(&rng.vec(b_ * hq * d, 1.0), dtype);
        let kd = round(&rng.vec(b_ * hkv * d, 1.0), dtype);
        let vd = round(&rng.vec(b_ * hkv * d, 1.0), dtype);
        emu.append(&bits(&kd), &bits(&vd), &lens_i).unwrap();
        reference::append(
            &mut rcache,
            &tensor(&kd, &[b_, hkv, d]),
            &tensor(&vd, &[b_, hkv, d]),
            &lens,
            &shape,
        )
        .unwrap();
        let got = emu.decode(&bits(&qd), &lens_i, scale).unwrap();
        let want =
            reference::decode(&tensor(&qd, &[b_, hq, d]), &rcache, &lens, &shape, scale).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        compare(
            case.name,
            &format!("{backend} decode step {s}"),
            &got,
            &want,
            dtype,
        );
        if s + 1 == case.steps {
            check_cache(
                case.name,
                "after appends",
                &emu.cache_to_host().unwrap(),
                &rcache,
                &shape,
                &lens,
                dtype,
            );
        }
    }
}

/// Valid slots (those a row holding `t` tokens has written) must match bit for bit.
fn check_cache(
    name: &str,
    what: &str,
    got: &HostCache,
    want: &reference::LayerCache,
    shape: &LayerShape,
    lens: &[usize],
    dtype: Dtype,
) {
    let d = shape.head_dim;
    for (label, g, w) in [("K", &got.k, &want.k), ("V", &got.v, &want.v)] {
        let w = w
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (b, &t) in lens.iter().enumerate() {
            for j in 0..shape.num_kv_heads {
                for slot in 0..t.min(shape.kv_capacity[j]) {
                    let base = (b * shape.total_slots + shape.kv_offset[j] + slot) * d;
                    for i in 0..d {
                        assert_eq!(
                            dtype.from_bits(g[base + i]),
                            w[base + i],
                            "{name} {what}: {label} row {b} KV head {j} slot {slot} dim {i}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gqa4_d64_f16_ragged_wrapping() {
    run(&Case {
        name: "emu_gqa4_d64_f16",
        hq: 8,
        hkv: 2,
        d: 64,
        dtype: Dtype::F16,
        rules: vec![
            (-1024.0, 0.0),
            (0.0, 0.375),
            (0.0, 0.5),
            (8192.0, 0.0),
            (0.0, 0.25),
            (-1024.0, 0.0),
            (0.0, 0.5),
            (0.0, 0.125),
        ],
        prompt_lens: vec![300, 37, 130],
        max_new: 200,
        steps: 140,
        fixed: false,
        heads_per_cta: 0,
    });
}

#[test]
fn gqa3_d128_bf16_t_equals_capacity() {
    run(&Case {
        name: "emu_gqa3_d128_bf16",
        hq: 6,
        hkv: 2,
        d: 128,
        dtype: Dtype::Bf16,
        rules: vec![
            (0.0, 0.5),
            (8192.0, 0.0),
            (0.0, 0.75),
            (0.0, 0.5),
            (0.0, 0.5),
            (0.0, 0.5),
        ],
        prompt_lens: vec![128, 20],
        max_new: 64,
        steps: 64,
        fixed: false,
        heads_per_cta: 0,
    });
}

#[test]
fn mha_d128_f16_minimal_windows_fixed_n() {
    run(&Case {
        name: "emu_mha_d128_f16_fixed",
        hq: 2,
        hkv: 2,
        d: 128,
        dtype: Dtype::F16,
        rules: vec![(0.0, 0.0), (-1024.0, 0.125)],
        prompt_lens: vec![200, 64],
        max_new: 150,
        steps: 150,
        fixed: true,
        heads_per_cta: 0,
    });
}

#[test]
fn gqa4_d128_bf16_long_window_many_splits() {
    // A window of 1024+ slots: several decode splits per KV head, merged.
    run(&Case {
        name: "emu_gqa4_d128_bf16_splits",
        hq: 4,
        hkv: 1,
        d: 128,
        dtype: Dtype::Bf16,
        rules: vec![(8192.0, 0.0), (0.0, 0.25), (1024.0, 0.0), (-1024.0, 0.0)],
        prompt_lens: vec![1100],
        max_new: 40,
        steps: 8,
        fixed: false,
        heads_per_cta: 0,
    });
}

/// One unit holds the kernels of two layers behind one entry: slot 0 and slot 1 write
/// their own layer's cache (each matching the reference), a slot the unit does not
/// define writes nothing.
#[test]
fn unit_entry_runs_the_kernel_its_slot_names() {
    use moac::abi::{Arg, ArgPack};
    use moac_runtime::backend::launch::{self, AppendBufs};
    let model = moac::plan::ModelShape {
        num_layers: 2,
        num_query_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
    };
    let alphas = vec![vec![0.0, 64.0, 0.0, 128.0], vec![512.0, 0.0, 0.0, 0.0]];
    let betas = vec![vec![0.5, 0.125, 0.25, 0.0], vec![0.0, 1.0, 0.125, 0.5]];
    let plan = moac::plan::validate(
        std::path::Path::new("two-layers"),
        model,
        moac::plan::Settings::default(),
        &alphas,
        &betas,
    )
    .unwrap();
    let low = moac::ir::lower(&plan, &LowerOptions::default()).unwrap();
    let units = moac::emit::emit_units(&low).unwrap();
    let unit = units
        .iter()
        .find(|u| u.name.starts_with("moac_append_f16_d64_g2_unit_"))
        .unwrap();
    assert_eq!(unit.kernels.len(), 2, "one append kernel per layer");
    let module =
        EmuModule::build(&unit.source, &[unit.name.as_str()], &EmuOptions::default()).unwrap();
    let geo = CacheGeometry::new(&plan, 900, 100).unwrap();
    let dtype = Dtype::F16;
    let mut rng = Rng::fresh("unit_entry_runs_the_kernel_its_slot_names");
    let (b, d, hkv) = (2usize, 64usize, 2usize);
    let lens = [700usize, 1000];
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let kn: Vec<f32> = (0..b * hkv * d).map(|_| rng.uniform()).collect();
    let vn: Vec<f32> = (0..b * hkv * d).map(|_| rng.uniform()).collect();
    let bits = |x: &[f32]| x.iter().map(|&v| dtype.to_bits(v)).collect::<Vec<u16>>();
    let (knb, vnb) = (bits(&kn), bits(&vn));
    let nan = dtype.to_bits(f32::NAN);
    for slot in [0i32, 1, 2, -1] {
        // The layer whose kernel sits at this slot (unit kernels are in name order).
        let layer = match slot {
            0 | 1 => low
                .layers
                .iter()
                .position(|l| l.append == unit.kernels[slot as usize])
                .unwrap(),
            _ => 0,
        };
        let shape = LayerShape::new(&geo, layer);
        let n = b * shape.total_slots * d;
        let mut cache = HostCache {
            batch: b,
            k: vec![nan; n],
            v: vec![nan; n],
        };
        let bufs = AppendBufs {
            k_new: knb.as_ptr() as u64,
            v_new: vnb.as_ptr() as u64,
            k_cache: cache.k.as_mut_ptr() as u64,
            v_cache: cache.v.as_mut_ptr() as u64,
            seq_lens: lens_i.as_ptr() as u64,
        };
        let mut args = launch::append(&shape, bufs, b);
        args.push(("slot", Arg::I32(slot)));
        let spec = low
            .kernels
            .iter()
            .find(|k| k.name == unit.kernels[0])
            .unwrap();
        let mut pack = ArgPack::new(&unit.name, spec.kind, &args).unwrap();
        module
            .launch(
                &unit.name,
                moac::abi::grid(KernelKind::Append, &spec.launch, &shape.grid_dims(b, 0)),
                moac::abi::block(&spec.launch),
                &mut pack,
            )
            .unwrap();
        let written = cache.k.iter().filter(|&&x| x != nan).count();
        if !(0..=1).contains(&slot) {
            assert_eq!(
                written, 0,
                "slot {slot} is not in the unit: nothing written"
            );
            continue;
        }
        // Exactly one slot per (row, KV head) holds the new token, where the layer's
        // geometry puts position t-1.
        assert_eq!(written, b * hkv * d, "slot {slot}");
        let mut rc = reference::LayerCache {
            k: Tensor::zeros((b, shape.total_slots, d), DType::F32, &Device::Cpu).unwrap(),
            v: Tensor::zeros((b, shape.total_slots, d), DType::F32, &Device::Cpu).unwrap(),
        };
        let t = |x: &[f32]| {
            Tensor::from_vec(x.to_vec(), (b, hkv, d), &Device::Cpu)
                .unwrap()
                .to_dtype(candle_dtype(dtype))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        reference::append(&mut rc, &t(&kn), &t(&vn), &lens, &shape).unwrap();
        let want = rc.k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (&g, &w)) in cache.k.iter().zip(&want).enumerate() {
            if g != nan {
                assert_eq!(dtype.from_bits(g), w, "slot {slot}, element {i}");
            }
        }
    }
}

/// A group of 3 split over 3 CTAs (one query head each), the heads' windows differing.
#[test]
fn gqa3_one_head_per_cta() {
    run(&Case {
        name: "emu_gqa3_one_head_per_cta",
        hq: 6,
        hkv: 2,
        d: 64,
        dtype: Dtype::F16,
        rules: vec![
            (0.0, 0.25),
            (1024.0, 0.0),
            (0.0, 0.75),
            (64.0, 0.125),
            (0.0, 0.5),
            (0.0, 1.0),
        ],
        prompt_lens: vec![300, 77, 9],
        max_new: 96,
        steps: 90,
        fixed: false,
        heads_per_cta: 1,
    });
}
