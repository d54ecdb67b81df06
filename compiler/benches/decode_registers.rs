//! Registers and spills of the decode and append kernels by group size G (query heads
//! per KV head), head_dim and decode `heads_per_cta` (query heads per CTA), from ptxas
//! (no GPU needed). Run with `cargo bench -p moac --bench decode_registers` after
//! scripts/setup-nvrtc.sh; `--arch sm_80` picks the arch (default sm_90).

use moac::ir::{KernelKind, LaunchConfig, LowerOptions};
use moac::jit::nvrtc;
use moac::plan::synthetic::{synthetic, Rules};
use moac::plan::ModelShape;

fn main() {
    let arch = std::env::args()
        .skip_while(|a| a != "--arch")
        .nth(1)
        .unwrap_or_else(|| "sm_90".to_string());
    let nv = match nvrtc::load() {
        Ok(nv) => nv,
        Err(e) => {
            eprintln!("skipping: {e}");
            return;
        }
    };
    println!(
        "decode and append by group size on {arch} (NVRTC {})",
        nv.version
    );
    println!(
        "{:>3} {:>4} {:>9} {:>11} {:>11} {:>12} {:>12}",
        "G", "D", "heads/CTA", "decode regs", "decode spill", "append regs", "append spill"
    );
    for g in 1..=16usize {
        for d in [64usize, 128] {
            let model = ModelShape {
                num_layers: 1,
                num_query_heads: 2 * g,
                num_kv_heads: 2,
                head_dim: d,
            };
            let plan = match synthetic("g", model, Rules::Grid, g as u64) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("G={g}: {e}");
                    continue;
                }
            };
            let default = LaunchConfig::default_for(KernelKind::Decode, d);
            for hpc in (1..=g).filter(|h| g % h == 0) {
                let mut opts = LowerOptions::default();
                opts.launch_overrides.insert(
                    "decode".into(),
                    LaunchConfig {
                        heads_per_cta: hpc as u32,
                        ..default
                    },
                );
                let figures = |kind: KernelKind| -> Option<(u32, u32)> {
                    let low = moac::ir::lower(&plan, &opts).ok()?;
                    let units = moac::emit::emit_units(&low).ok()?;
                    let unit = units
                        .iter()
                        .find(|u| u.name.starts_with(&format!("moac_{}_", kind.slug())))?;
                    let options = nvrtc::options(&arch, &nv.include_dir);
                    let c = nvrtc::compile(nv, &unit.name, &unit.source, &arch, &options)
                        .map_err(|e| eprintln!("G={g} D={d}: {e}"))
                        .ok()?;
                    let r = nvrtc::parse_entry_resources(&c.log);
                    let r = r.get(&unit.name)?;
                    Some((r.registers, r.spill_bytes))
                };
                let show = |x: Option<(u32, u32)>| match x {
                    Some((r, s)) => (r.to_string(), s.to_string()),
                    None => ("-".into(), "-".into()),
                };
                let (dr, ds) = show(figures(KernelKind::Decode));
                let (ar, asp) = if hpc == g {
                    show(figures(KernelKind::Append))
                } else {
                    (String::new(), String::new())
                };
                println!("{g:>3} {d:>4} {hpc:>9} {dr:>11} {ds:>11} {ar:>12} {asp:>12}");
            }
        }
    }
}
