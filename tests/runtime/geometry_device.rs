//! The generated units compute every head's capacity on the device from the baked rule
//! tables (a dictionary of distinct (alpha, beta) and an index per head) and the runtime
//! N. This runs that exact code (the unit's `moac_cta`, built on the emu engine) for
//! every N from 1 to 4096 and thousands more up to 1M tokens (2^20), and requires the
//! KV-head capacities, offsets, totals and ring lengths to equal the compiler's
//! `LayerGeometry::of`, the one host-side statement of the geometry, bit for bit; for
//! one-kernel units (rules folded to constants), several-kernel units (a runtime slot)
//! and units split by the constant budget.
#![allow(clippy::unwrap_used)]

use moac::emit::{emit_units_with, EmitOptions, SourceUnit};
use moac::geometry::LayerGeometry;
use moac::ir::{KernelKind, LowerOptions};
use moac::plan::{ModelShape, Settings, ValidPlan};
use moac_runtime::backend::emu::{cache, EmuOptions, HEADER};
use moac_test_support::Rng;

type Probe = unsafe extern "C" fn(i32, i32, i64, *mut i64);

/// The unit's source plus a C-ABI probe that writes `moac_cta(slot, j, n)` out.
fn with_probe(unit: &SourceUnit) -> String {
    format!(
        "{}\nextern \"C\" void moac_probe(int slot, int j, long long n, long long* out) {{\n    MoacCta w = moac_cta(slot, j, n);\n    out[0] = w.ckv;\n    out[1] = w.kv_off;\n    out[2] = w.total;\n    for (int g = 0; g < G; ++g) out[3 + g] = w.local_q[g];\n}}\n",
        unit.source
    )
}

fn plan(layers: usize, hq: usize, hkv: usize, rng: &mut Rng) -> ValidPlan {
    // Dyadic and non-dyadic betas, negative and large alphas, beta 1 (C = N): every
    // corner of trunc(alpha + beta * N) in double.
    let alphas = [-1024.0, 0.0, 64.0, 333.3, 1024.0, 2048.0, 100_000.0, -7.5];
    let betas = [0.0, 0.1, 0.125, 0.3, 0.333, 0.5, 0.7, 0.999, 1.0];
    let pick = |rng: &mut Rng, n: usize| (rng.next_u64() % n as u64) as usize;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..layers {
        a.push((0..hq).map(|_| alphas[pick(rng, alphas.len())]).collect());
        b.push((0..hq).map(|_| betas[pick(rng, betas.len())]).collect());
    }
    let model = ModelShape {
        num_layers: layers,
        num_query_heads: hq,
        num_kv_heads: hkv,
        head_dim: 64,
    };
    moac::plan::validate(
        std::path::Path::new("geometry-probe"),
        model,
        Settings::default(),
        &a,
        &b,
    )
    .unwrap()
}

/// N from 1 to 4096, every multiple of 64 and its neighbours up to 65536, random N up
/// to 2^20, and 2^20 itself.
fn sweep(rng: &mut Rng) -> Vec<i64> {
    let mut ns: Vec<i64> = (1..=4096).collect();
    for m in (64..=65536).step_by(64) {
        ns.extend([m - 1, m, m + 1]);
    }
    ns.extend((0..3000).map(|_| 4097 + (rng.next_u64() % ((1 << 20) - 4096)) as i64));
    ns.push(1 << 20);
    ns.sort_unstable();
    ns.dedup();
    ns
}

fn check(plan: &ValidPlan, budget: usize, rng: &mut Rng) -> usize {
    let low = moac::ir::lower(plan, &LowerOptions::default()).unwrap();
    let units = emit_units_with(
        &low,
        &EmitOptions {
            const_budget: budget,
        },
    )
    .unwrap();
    let settings = *plan.settings();
    let g = plan.model().group_size();
    let hkv = plan.model().num_kv_heads;
    let ns = sweep(rng);
    let mut appends = 0;
    for unit in units.iter().filter(|u| u.name.starts_with("moac_append_")) {
        appends += 1;
        let so = moac::jit::gxx::build(
            &with_probe(unit),
            &[unit.name.as_str()],
            HEADER,
            &EmuOptions::default(),
            &cache(),
        )
        .unwrap();
        // SAFETY: a library built just now from generated source and the emu header.
        let lib = unsafe { libloading::Library::new(&so) }.unwrap();
        // SAFETY: `moac_probe` is defined above with exactly this signature.
        let probe: libloading::Symbol<Probe> = unsafe { lib.get(b"moac_probe\0") }.unwrap();
        for (slot, name) in unit.kernels.iter().enumerate() {
            let spec = low.kernels.iter().find(|k| &k.name == name).unwrap();
            assert_eq!(spec.kind, KernelKind::Append);
            let mut out = vec![0i64; 3 + g];
            for &n in &ns {
                let want = LayerGeometry::of(&spec.heads, n as u64, &settings, g);
                for j in 0..hkv {
                    // SAFETY: `out` holds 3 + G values, what the probe writes.
                    unsafe { probe(slot as i32, j as i32, n, out.as_mut_ptr()) };
                    let local: Vec<i64> = (0..g)
                        .map(|x| (want.query_capacity[j * g + x] - settings.sink) as i64)
                        .collect();
                    assert_eq!(
                        (out[0], out[1], out[2], &out[3..]),
                        (
                            want.kv_capacity[j] as i64,
                            want.kv_offset[j] as i64,
                            want.total_slots as i64,
                            &local[..]
                        ),
                        "{}: slot {slot}, KV head {j}, N = {n}",
                        unit.name
                    );
                }
            }
        }
    }
    appends
}

#[test]
fn device_capacities_equal_the_host_geometry_up_to_a_million_tokens() {
    let mut rng = Rng::fresh("device_capacities");
    // One kernel in its unit: the rules fold to constants.
    assert_eq!(check(&plan(1, 6, 2, &mut rng), 48 * 1024, &mut rng), 1);
    // Four layers of distinct rules in one unit: a runtime slot picks the row.
    assert_eq!(check(&plan(4, 8, 2, &mut rng), 48 * 1024, &mut rng), 1);
    // The same split over units by a small constant budget.
    assert!(check(&plan(4, 8, 2, &mut rng), 200, &mut rng) >= 2);
}
