//! Launch configurations: what each kind's knobs mean, the defaults, the heuristic that
//! sizes them for a device, and the candidates the tuner tries.

use super::{KernelKind, MAX_HEADS_PER_CTA};

/// Query heads per decode CTA when nothing chose: the largest divisor of the group size
/// that is at most [`MAX_HEADS_PER_CTA`] (the whole group up to 8; 8 of 16, 6 of 12, 5
/// of 15, ...), so a group's queries and accumulators stay in registers without spills.
pub fn default_heads_per_cta(group: usize) -> u32 {
    (1..=group.clamp(1, MAX_HEADS_PER_CTA))
        .rev()
        .find(|h| group.is_multiple_of(*h))
        .unwrap_or(1) as u32
}
use serde::Serialize;

/// Launch configuration of one kernel. Which fields matter depends on the kind; the
/// others keep their defaults so that specs compare and hash predictably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
pub struct LaunchConfig {
    /// Threads per block.
    pub threads: u32,
    /// decode: KV slots per split (CTA).
    pub chunk: u32,
    /// fill: slots per CTA.
    pub rows: u32,
    /// prefill: queries per CTA.
    pub block_q: u32,
    /// prefill: keys per shared-memory tile.
    pub block_k: u32,
    /// decode: key rows each row group loads ahead per iteration (tokens in flight =
    /// threads / lanes per row x unroll); 0: chosen from the group size (4 for G <= 2,
    /// else 2). Left out of the serialized form when 0, so configurations without it
    /// keep their names.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unroll: u32,
    /// decode: query heads of a group each CTA runs (a divisor of the group size; the
    /// group's other heads go to sibling CTAs that read the same keys). 0: the whole
    /// group. Left out of the serialized form when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub heads_per_cta: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What the default launch heuristic knows of the target GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeviceProps {
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Static shared memory one block may use, bytes (48 KiB on every arch moac targets).
    pub static_shared_per_block: u32,
}

impl DeviceProps {
    /// A GPU with `sm_count` SMs and the 48 KiB of static shared memory per block every
    /// arch moac targets has.
    pub fn with_sm_count(sm_count: u32) -> DeviceProps {
        DeviceProps {
            sm_count,
            static_shared_per_block: 48 * 1024,
        }
    }

    /// The figures of an arch's data-center part, for compiling without the GPU at hand:
    /// sm_80 A100 (108 SMs), sm_86 A10 (72), sm_89 L40S (142), sm_90 H100/H200 (132),
    /// sm_100 B200 (148), sm_120 RTX PRO 6000 (188). `None` for an arch not listed.
    pub fn for_arch(arch: &str) -> Option<DeviceProps> {
        let sm_count = match arch {
            "sm_80" => 108,
            "sm_86" => 72,
            "sm_89" => 142,
            "sm_90" | "sm_90a" => 132,
            "sm_100" | "sm_100a" => 148,
            "sm_120" | "sm_120a" => 188,
            _ => return None,
        };
        Some(DeviceProps::with_sm_count(sm_count))
    }
}

/// Where a kernel's launch configuration came from (recorded in the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchSource {
    /// The default heuristic (from the device's properties when known).
    #[default]
    Heuristic,
    /// The winner of a tuning database entry for this kernel.
    Database,
    /// Set explicitly for every kernel of its kind (`LowerOptions::launch_overrides`).
    Override,
}

impl LaunchSource {
    pub fn name(self) -> &'static str {
        match self {
            LaunchSource::Heuristic => "heuristic",
            LaunchSource::Database => "database",
            LaunchSource::Override => "override",
        }
    }
}

impl LaunchConfig {
    /// The default heuristic for a kind on a device: `kv_slots` is a typical KV-head
    /// capacity of the kernel (the decode split is sized so that one sequence alone gives
    /// the device two CTAs per SM), and the prefill tiles are the largest that fit the
    /// device's static shared memory. Without a device, [`LaunchConfig::default_for`].
    pub fn heuristic(
        kind: KernelKind,
        head_dim: usize,
        num_kv_heads: usize,
        kv_slots: u64,
        dev: Option<DeviceProps>,
    ) -> Self {
        let base = LaunchConfig::default_for(kind, head_dim);
        let Some(dev) = dev else { return base };
        match kind {
            KernelKind::Decode => {
                let want_ctas = 2 * dev.sm_count as u64;
                let chunk = [1024u32, 512, 256, 128]
                    .into_iter()
                    .find(|&c| kv_slots.div_ceil(c as u64) * num_kv_heads as u64 >= want_ctas)
                    .unwrap_or(128);
                LaunchConfig { chunk, ..base }
            }
            KernelKind::Prefill(_) => {
                let row = (head_dim as u32 / 8 + 1) * 16;
                let (block_q, block_k) = [(64, 64), (64, 32), (32, 32), (16, 16)]
                    .into_iter()
                    .find(|&(q, k)| (q + k) * row <= dev.static_shared_per_block)
                    .unwrap_or((16, 16));
                LaunchConfig {
                    block_q,
                    block_k,
                    threads: base.threads.min(block_q * 8),
                    ..base
                }
            }
            _ => base,
        }
    }

    /// This configuration with every knob left to its default (0) filled in, as the
    /// kernel will run: decode's `heads_per_cta` ([`default_heads_per_cta`]) and `unroll`
    /// (0: 4 steps in flight for at most 2 query heads per CTA, else 2). Templates and
    /// launch grids read resolved values only.
    pub fn resolved(self, kind: KernelKind, group: usize) -> LaunchConfig {
        if kind != KernelKind::Decode {
            return self;
        }
        let heads_per_cta = match self.heads_per_cta {
            0 => default_heads_per_cta(group),
            h => h,
        };
        let unroll = match self.unroll {
            0 if heads_per_cta <= 2 => 4,
            0 => 2,
            u => u,
        };
        LaunchConfig {
            heads_per_cta,
            unroll,
            ..self
        }
    }

    /// The launch configurations the tuner may pick for a kernel kind of a model with
    /// this head_dim and group size (query heads per KV head), resolved; the first is
    /// the arch-independent default.
    pub fn candidates(kind: KernelKind, head_dim: usize, group: usize) -> Vec<LaunchConfig> {
        let base = LaunchConfig::default_for(kind, head_dim);
        let mut out: Vec<LaunchConfig> = Vec::new();
        let mut push = |c: LaunchConfig| {
            let c = c.resolved(kind, group);
            if !out.contains(&c) {
                out.push(c);
            }
        };
        push(base);
        match kind {
            KernelKind::Decode => {
                for threads in [64, 128, 256] {
                    for chunk in [128, 256, 512, 1024] {
                        push(LaunchConfig {
                            threads,
                            chunk,
                            ..base
                        });
                    }
                }
                // Loads in flight: explicit unroll depths at the default thread count.
                for unroll in [1, 2, 4] {
                    for chunk in [256, 512] {
                        push(LaunchConfig {
                            threads: 128,
                            chunk,
                            unroll,
                            ..base
                        });
                    }
                }
                // Fewer query heads per CTA (fewer registers, more CTAs reading each key).
                for heads_per_cta in
                    (1..group.min(MAX_HEADS_PER_CTA + 1)).filter(|h| group.is_multiple_of(*h))
                {
                    for chunk in [256, 512] {
                        push(LaunchConfig {
                            threads: 128,
                            chunk,
                            heads_per_cta: heads_per_cta as u32,
                            ..base
                        });
                    }
                }
            }
            KernelKind::Fill => {
                for threads in [64, 128, 256] {
                    for rows in [32, 64, 128] {
                        push(LaunchConfig {
                            threads,
                            rows,
                            ..base
                        });
                    }
                }
            }
            KernelKind::Append => {
                for threads in [32, 64] {
                    push(LaunchConfig { threads, ..base });
                }
            }
            KernelKind::Prefill(_) => {
                for threads in [128, 256] {
                    for (block_q, block_k) in [(64, 64), (64, 32), (32, 64), (32, 32)] {
                        push(LaunchConfig {
                            threads,
                            block_q,
                            block_k,
                            ..base
                        });
                    }
                }
            }
            KernelKind::Merge => {}
        }
        out
    }

    /// Every knob 0 (unset): what a tuning identity hashes in place of the launch.
    pub const UNSET: LaunchConfig = LaunchConfig {
        threads: 0,
        chunk: 0,
        rows: 0,
        block_q: 0,
        block_k: 0,
        unroll: 0,
        heads_per_cta: 0,
    };

    /// The default heuristic for each kind with nothing known of the device.
    pub fn default_for(kind: KernelKind, head_dim: usize) -> Self {
        let base = LaunchConfig {
            threads: 128,
            ..LaunchConfig::UNSET
        };
        match kind {
            KernelKind::Decode => LaunchConfig { chunk: 256, ..base },
            KernelKind::Merge => LaunchConfig {
                threads: head_dim as u32,
                ..base
            },
            KernelKind::Append => LaunchConfig {
                threads: (head_dim / 8).max(32) as u32,
                ..base
            },
            KernelKind::Fill => LaunchConfig { rows: 64, ..base },
            KernelKind::Prefill(_) => LaunchConfig {
                threads: 128,
                block_q: 64,
                block_k: 64,
                ..base
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::PrefillMode;

    #[test]
    fn heuristic_sizes_decode_splits_and_prefill_tiles_by_device() {
        let h100 = DeviceProps::for_arch("sm_90").unwrap();
        assert_eq!(h100.sm_count, 132);
        assert!(DeviceProps::for_arch("sm_75").is_none());
        let dec =
            |slots, hkv, dev| LaunchConfig::heuristic(KernelKind::Decode, 128, hkv, slots, dev);
        // No device: the arch-independent default.
        assert_eq!(
            dec(100_000, 8, None),
            LaunchConfig::default_for(KernelKind::Decode, 128)
        );
        // 8 KV heads x 100k slots: 1024-slot splits already give 8 x 98 >= 264 CTAs.
        assert_eq!(dec(100_000, 8, Some(h100)).chunk, 1024);
        // 8 x 4096 slots: 8 x 16 = 128 < 264 at 256, 8 x 32 = 256 < 264 at 128: the smallest.
        assert_eq!(dec(4096, 8, Some(h100)).chunk, 128);
        // 32 KV heads x 20k slots: 1024-slot splits give 32 x 20 = 640 CTAs.
        assert_eq!(dec(20_000, 32, Some(h100)).chunk, 1024);
        for d in [64, 128, 256] {
            let p = LaunchConfig::heuristic(
                KernelKind::Prefill(PrefillMode::Token),
                d,
                8,
                0,
                Some(h100),
            );
            let row = (d as u32 / 8 + 1) * 16;
            assert!((p.block_q + p.block_k) * row <= 48 * 1024, "d{d}: {p:?}");
            assert_eq!(p.block_q % (p.threads / 8), 0, "d{d}: {p:?}");
        }
        assert_eq!(
            LaunchConfig::heuristic(
                KernelKind::Prefill(PrefillMode::Token),
                256,
                8,
                0,
                Some(h100)
            )
            .block_q,
            32
        );
    }

    #[test]
    fn candidate_spaces_start_with_the_default_and_have_no_repeats() {
        for kind in [
            KernelKind::Decode,
            KernelKind::Merge,
            KernelKind::Append,
            KernelKind::Fill,
            KernelKind::Prefill(PrefillMode::Block64),
        ] {
            let c = LaunchConfig::candidates(kind, 128, 4);
            assert_eq!(c[0], LaunchConfig::default_for(kind, 128).resolved(kind, 4));
            for (i, x) in c.iter().enumerate() {
                assert!(!c[i + 1..].contains(x), "{kind:?} repeats {x:?}");
            }
            assert_eq!(KernelKind::from_slug(&kind.slug()), Some(kind));
        }
        assert!(LaunchConfig::candidates(KernelKind::Decode, 128, 4).len() >= 12);
        assert!(LaunchConfig::candidates(KernelKind::Decode, 128, 4)
            .iter()
            .any(|c| c.heads_per_cta == 2));
        assert!(LaunchConfig::candidates(KernelKind::Decode, 128, 1)
            .iter()
            .all(|c| c.heads_per_cta == 1));
        // Resolved: no candidate leaves a knob to the template.
        assert!(LaunchConfig::candidates(KernelKind::Decode, 128, 4)
            .iter()
            .all(|c| c.heads_per_cta > 0 && c.unroll > 0));
    }
}
