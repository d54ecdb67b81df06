//! The device-resident runtime API (`moac_runtime::gpu::attention`) on emu: prefill,
//! cache fill, append and split-KV decode on device buffers give bit for bit what the
//! CPU-tensor API gives on emu (the same kernels) and stay within the dtype's tolerance
//! of the cpu reference, for a batch of rows with different prompt lengths (one shorter
//! than the sink), query heads of one KV head with different windows, decode steps past
//! the windows (ring wrap-around), f16 and bf16; undersized buffers and absent layers
//! are refused by name. The host-buffer backend over the device API (`DeviceLayer`, the
//! cuda backend's) gives on emu bit for bit what the emu backend gives.
#![allow(clippy::unwrap_used)]

use candle_core::{Device, Tensor};
use moac::geometry::CacheGeometry;
use moac::geometry::Dtype;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::backend::{LayerBackend, LayerShape, Prompt};
use moac_runtime::gpu::attention::{DeviceAttention, DeviceLayer};
use moac_runtime::gpu::Gpu;
use moac_runtime::BackendHandle;
use moac_runtime::{Artifact, Backend, DecodeOptions, PrefillMode, PrefillOptions, Runtime};
use moac_test_support::{plan, tolerance, Rng};

fn rounded(rng: &mut Rng, n: usize, dtype: Dtype) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = (0..n).map(|_| dtype.to_bits(rng.uniform())).collect();
    let vals = bits.iter().map(|&b| dtype.from_bits(b)).collect();
    (bits, vals)
}

fn tensor(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

#[test]
fn device_api_matches_the_tensor_api() {
    let (hq, hkv, d) = (4, 2, 64);
    let rules = [(64.0, 0.25), (1e9, 0.0), (130.0, 0.0), (0.0, 0.5)];
    let lens = [180usize, 20, 97];
    let (b, p, max_new, steps) = (lens.len(), 180, 60, 60);
    for dtype in Dtype::ALL {
        let mut rng = Rng::new(0x5eed + dtype as u64);
        let art = Artifact::from_plan(&plan(hq, hkv, d, &rules), dtype, None).unwrap();
        let gpu = Gpu::open(Backend::Emu, EmuOptions::default()).unwrap();
        let att = DeviceAttention::new(&gpu, &art, p, max_new).unwrap();
        let emu = Runtime::new(art.clone(), Backend::Emu).unwrap();
        let cpu = Runtime::new(art, Backend::Cpu).unwrap();
        let mut ce = emu.allocate_cache(b, p, max_new).unwrap();
        let mut cc = cpu.allocate_cache(b, p, max_new).unwrap();
        let (qb, qv) = rounded(&mut rng, b * p * hq * d, dtype);
        let (kb, kv) = rounded(&mut rng, b * p * hkv * d, dtype);
        let (vb, vv) = rounded(&mut rng, b * p * hkv * d, dtype);
        let up16 = |v: &[u16]| {
            let mut buf = gpu.alloc_of::<u16>(v.len()).unwrap();
            gpu.upload(&mut buf, 0, v).unwrap();
            buf
        };
        let up32 = |v: &[i32]| {
            let mut buf = gpu.alloc_of::<i32>(v.len()).unwrap();
            gpu.upload(&mut buf, 0, v).unwrap();
            buf
        };
        let (q, k, v) = (up16(&qb), up16(&kb), up16(&vb));
        let plens = up32(&lens.map(|l| l as i32));
        let mut o = gpu.alloc_of::<u16>(qb.len()).unwrap();
        let scale = 1.0 / (d as f32).sqrt();
        let l0 = att.layer(0).unwrap();
        l0.prefill(
            &q,
            &k,
            &v,
            &plens,
            (b, p),
            &mut o,
            PrefillMode::Block64,
            scale,
        )
        .unwrap();
        let mut cache = att.new_cache(0, b).unwrap();
        l0.fill(&k, &v, &plens, (b, p), &mut cache).unwrap();
        let opts = PrefillOptions::default()
            .prompt_lens(lens.to_vec())
            .mode(PrefillMode::Block64);
        let (qt, kt, vt) = (
            tensor(&qv, &[b, p, hq, d]),
            tensor(&kv, &[b, p, hkv, d]),
            tensor(&vv, &[b, p, hkv, d]),
        );
        let want = emu.prefill(&mut ce, 0, &qt, &kt, &vt, &opts).unwrap();
        let reference = cpu.prefill(&mut cc, 0, &qt, &kt, &vt, &opts).unwrap();
        let got: Vec<f32> = gpu
            .download::<u16>(&o, 0, qb.len())
            .unwrap()
            .iter()
            .map(|&x| dtype.from_bits(x))
            .collect();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            got,
            flat(&want),
            "{dtype} prefill: device API vs tensor API on emu"
        );
        let (atol, rtol) = tolerance(dtype);
        let close = |a: &[f32], r: &[f32], what: &str| {
            for (i, (x, y)) in a.iter().zip(r).enumerate() {
                let err = (x - y).abs() as f64;
                assert!(
                    err <= atol + rtol * y.abs() as f64,
                    "{dtype} {what} [{i}]: {x} vs {y}"
                );
            }
        };
        close(&got, &flat(&reference), "prefill vs cpu");
        let mut scratch = att.scratch(b).unwrap();
        let mut out = gpu.alloc_of::<u16>(b * hq * d).unwrap();
        let mut seq = gpu.alloc_of::<i32>(b).unwrap();
        let mut held: Vec<usize> = lens.to_vec();
        for step in 0..steps {
            let (q1b, q1) = rounded(&mut rng, b * hq * d, dtype);
            let (k1b, k1) = rounded(&mut rng, b * hkv * d, dtype);
            let (v1b, v1) = rounded(&mut rng, b * hkv * d, dtype);
            for h in held.iter_mut() {
                *h += 1;
            }
            gpu.upload(
                &mut seq,
                0,
                &held.iter().map(|&h| h as i32).collect::<Vec<_>>(),
            )
            .unwrap();
            let (qd, kd, vd) = (up16(&q1b), up16(&k1b), up16(&v1b));
            l0.append(&kd, &vd, &seq, b, &mut cache).unwrap();
            l0.decode(&qd, &cache, &seq, b, &mut scratch, &mut out, scale)
                .unwrap();
            let (qt, kt, vt) = (
                tensor(&q1, &[b, hq, d]),
                tensor(&k1, &[b, hkv, d]),
                tensor(&v1, &[b, hkv, d]),
            );
            let dopt = DecodeOptions::default();
            let want = emu.decode_step(&mut ce, 0, &qt, &kt, &vt, &dopt).unwrap();
            let reference = cpu.decode_step(&mut cc, 0, &qt, &kt, &vt, &dopt).unwrap();
            let got: Vec<f32> = gpu
                .download::<u16>(&out, 0, b * hq * d)
                .unwrap()
                .iter()
                .map(|&x| dtype.from_bits(x))
                .collect();
            assert_eq!(got, flat(&want), "{dtype} decode step {step}");
            close(
                &got,
                &flat(&reference),
                &format!("decode step {step} vs cpu"),
            );
        }
        // Undersized buffers and absent layers are refused by name.
        let small = gpu.alloc_of::<u16>(8).unwrap();
        let e = l0
            .decode(&small, &cache, &seq, b, &mut scratch, &mut out, scale)
            .unwrap_err()
            .to_string();
        assert!(e.contains("q must be"), "{e}");
        let e = l0
            .append(&small, &small, &seq, b + 1, &mut cache)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cache"), "{e}");
        assert!(att
            .new_cache(3, 1)
            .err()
            .unwrap()
            .to_string()
            .contains("layer 3"));
        assert!(att.layer(3).is_err(), "an absent layer");
    }
}

/// An allocation no machine can make is an out-of-memory error naming the bytes asked
/// for, not a usage error.
#[test]
fn an_impossible_allocation_is_out_of_memory() {
    let gpu = Gpu::open(Backend::Emu, EmuOptions::default()).unwrap();
    let bytes = usize::MAX - 7;
    match gpu.alloc(bytes) {
        Err(e @ moac_runtime::Error::OutOfMemory { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&bytes.to_string()), "{text}");
        }
        Err(e) => panic!("expected OutOfMemory, got {e:?}"),
        Ok(_) => panic!("allocated {bytes} bytes"),
    }
}

/// `DeviceLayer` (the cuda backend's `LayerBackend`: uploads, poisoned outputs, the
/// device API, downloads) run on emu against the emu backend: the same bits for the
/// prefill, every decode step past the windows and the whole cache (NaN poison of the
/// slots no row reached included), for rows of different prompt lengths (one inside
/// the sink), f16 with head_dim 64 and bf16 with 128; a decode without a cache is
/// refused.
#[test]
fn device_layer_matches_the_emu_backend() {
    let (hq, hkv) = (4, 2);
    let rules = [(64.0, 0.25), (1e9, 0.0), (130.0, 0.0), (0.0, 0.5)];
    let lens = [150i32, 30, 97];
    let (b, p, max_new, steps) = (lens.len(), 150, 40, 40);
    for (dtype, d) in [(Dtype::F16, 64), (Dtype::Bf16, 128)] {
        let mut rng = Rng::new(0xd1ce + dtype as u64);
        let art = Artifact::from_plan(&plan(hq, hkv, d, &rules), dtype, None).unwrap();
        let geo = CacheGeometry::new(art.plan(), p as u64, max_new as u64).unwrap();
        let shape = LayerShape::new(&geo, 0);
        let setup = art.layer_setup(&shape).unwrap();
        let gpu = Gpu::open(Backend::Emu, EmuOptions::default()).unwrap();
        let mut dev = DeviceLayer::new(&gpu, &setup).unwrap();
        let (qb, _) = rounded(&mut rng, b * p * hq * d, dtype);
        let e = dev.decode(&qb[..b * hq * d], &[1, 1, 1], 0.125);
        assert!(
            e.unwrap_err().to_string().contains("no cache"),
            "decode before new_cache"
        );
        dev.new_cache(b).unwrap();
        let emu_handle = BackendHandle::open(Backend::Emu, EmuOptions::default()).unwrap();
        let mut emu = emu_handle.open_layer(&setup, b).unwrap();
        assert_eq!(
            dev.cache_to_host().unwrap().k,
            emu.cache_to_host().unwrap().k,
            "{dtype}: a new cache is poisoned alike"
        );
        let (kb, _) = rounded(&mut rng, b * p * hkv * d, dtype);
        let (vb, _) = rounded(&mut rng, b * p * hkv * d, dtype);
        let pr = Prompt {
            k: &kb,
            v: &vb,
            lens: &lens,
            p,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let mode = PrefillMode::Block64;
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let got = dev.prefill_and_fill(&qb, &pr, mode, scale).unwrap();
        let want = emu.prefill_and_fill(&qb, &pr, mode, scale).unwrap();
        assert_eq!(bits(got), bits(want), "{dtype} prefill");
        let mut held = lens.to_vec();
        for step in 0..steps {
            let (q1, _) = rounded(&mut rng, b * hq * d, dtype);
            let (k1, _) = rounded(&mut rng, b * hkv * d, dtype);
            let (v1, _) = rounded(&mut rng, b * hkv * d, dtype);
            for h in held.iter_mut() {
                *h += 1;
            }
            dev.append(&k1, &v1, &held).unwrap();
            emu.append(&k1, &v1, &held).unwrap();
            let got = dev.decode(&q1, &held, scale).unwrap();
            let want = emu.decode(&q1, &held, scale).unwrap();
            assert_eq!(bits(got), bits(want), "{dtype} decode step {step}");
        }
        let (c1, c2) = (dev.cache_to_host().unwrap(), emu.cache_to_host().unwrap());
        assert_eq!((c1.k, c1.v), (c2.k, c2.v), "{dtype} cache after the steps");
        // Steps past N are refused before any upload.
        let too_long = vec![shape.n as i32 + 1; b];
        assert!(dev.decode(&qb[..b * hq * d], &too_long, scale).is_err());
    }
}
