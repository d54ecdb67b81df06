//! The kernel ABI, stated once: every kind's entry-point parameters (name and type, in
//! order), the launch grid and block of every kind, and the packing of arguments by name
//! into `cuLaunchKernel`'s `void**`. The templates render their entry signatures from
//! [`params`] ([`entry_signature`], [`body_args`]); the manifest and the bindings list
//! the same table; the emu and cuda backends pack through [`ArgPack`]. Adding a
//! parameter means: a row here, the template body, and the backend code that has the
//! value (docs/kernel-abi.md).

use crate::error::{Error, Result};
use crate::ir::{KernelKind, LaunchConfig};
use serde::{Deserialize, Serialize};

/// Element type behind a pointer parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Elem {
    /// The build's dtype (f16 or bf16).
    Scalar,
    #[serde(rename = "f32")]
    Float,
    #[serde(rename = "i32")]
    Int,
}

/// Type of one kernel parameter, as passed through `cuLaunchKernel`'s `void**`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "elem", rename_all = "snake_case")]
pub enum Param {
    ConstPtr(Elem),
    MutPtr(Elem),
    I32,
    I64,
    F32,
}

/// The parameters of each kernel kind's entry point, in order (docs/kernel-abi.md). The
/// first, `slot`, picks the kernel among those of its translation unit.
pub fn params(kind: KernelKind) -> &'static [(&'static str, Param)] {
    use Elem::{Float, Int, Scalar};
    use Param::*;
    match kind {
        KernelKind::Append => &[
            ("slot", I32),
            ("k_new", ConstPtr(Scalar)),
            ("v_new", ConstPtr(Scalar)),
            ("k_cache", MutPtr(Scalar)),
            ("v_cache", MutPtr(Scalar)),
            ("seq_lens", ConstPtr(Int)),
            ("n", I64),
            ("batch", I32),
        ],
        KernelKind::Fill => &[
            ("slot", I32),
            ("k", ConstPtr(Scalar)),
            ("v", ConstPtr(Scalar)),
            ("k_cache", MutPtr(Scalar)),
            ("v_cache", MutPtr(Scalar)),
            ("prompt_lens", ConstPtr(Int)),
            ("p_stride", I32),
            ("n", I64),
            ("batch", I32),
        ],
        KernelKind::Decode => &[
            ("slot", I32),
            ("q", ConstPtr(Scalar)),
            ("k_cache", ConstPtr(Scalar)),
            ("v_cache", ConstPtr(Scalar)),
            ("seq_lens", ConstPtr(Int)),
            ("part_o", MutPtr(Float)),
            ("part_lse", MutPtr(Float)),
            ("n", I64),
            ("batch", I32),
            ("nsplit", I32),
            ("scale", F32),
        ],
        KernelKind::Merge => &[
            ("slot", I32),
            ("part_o", ConstPtr(Float)),
            ("part_lse", ConstPtr(Float)),
            ("out", MutPtr(Scalar)),
            ("batch", I32),
            ("nsplit", I32),
        ],
        KernelKind::Prefill(_) => &[
            ("slot", I32),
            ("q", ConstPtr(Scalar)),
            ("k", ConstPtr(Scalar)),
            ("v", ConstPtr(Scalar)),
            ("o", MutPtr(Scalar)),
            ("prompt_lens", ConstPtr(Int)),
            ("p_stride", I32),
            ("n", I64),
            ("scale", F32),
        ],
    }
}

impl Param {
    /// The C type of the parameter in an entry signature; `T` is the unit's element type
    /// (a typedef every template's prelude declares).
    pub fn c_type(self) -> &'static str {
        let elem = |e: Elem| match e {
            Elem::Scalar => "T",
            Elem::Float => "float",
            Elem::Int => "int",
        };
        match self {
            Param::ConstPtr(e) => match elem(e) {
                "T" => "const T* __restrict__",
                "float" => "const float* __restrict__",
                _ => "const int* __restrict__",
            },
            Param::MutPtr(e) => match elem(e) {
                "T" => "T* __restrict__",
                "float" => "float* __restrict__",
                _ => "int* __restrict__",
            },
            Param::I32 => "int",
            Param::I64 => "long long",
            Param::F32 => "float",
        }
    }
}

/// The C parameter list of a kind's entry point, from [`params`]:
/// `int slot, const T* __restrict__ q, ...`.
pub fn entry_signature(kind: KernelKind) -> String {
    params(kind)
        .iter()
        .map(|(name, p)| format!("{} {name}", p.c_type()))
        .collect::<Vec<_>>()
        .join(",\n    ")
}

/// What an entry passes on to its kind's body: every parameter but `slot`, in order.
pub fn body_args(kind: KernelKind) -> String {
    params(kind)
        .iter()
        .skip(1)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A CUDA grid or block (x, y, z).
pub type Dim3 = (u32, u32, u32);

/// The sizes a launch grid depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridDims {
    pub batch: usize,
    /// Prefill: the (padded) prompt length of the launch.
    pub prompt_len: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    /// The layer's largest KV-head capacity.
    pub max_kv_capacity: usize,
}

/// Decode splits of a layer: `ceil(max C_kv / chunk)`.
pub fn decode_splits(max_kv_capacity: usize, launch: &LaunchConfig) -> usize {
    max_kv_capacity.div_ceil(launch.chunk.max(1) as usize)
}

/// The launch grid of a kind (docs/kernel-abi.md), for a resolved launch configuration:
///
/// - decode: `(nsplit, HKV * G / heads_per_cta, B)`
/// - merge: `(HQ, B)`
/// - append: `(HKV, B)`
/// - fill: `(ceil(max C_kv / rows), HKV, B)`
/// - prefill: `(ceil(P / block_q), HQ, B)`
pub fn grid(kind: KernelKind, launch: &LaunchConfig, d: &GridDims) -> Dim3 {
    let b = d.batch as u32;
    match kind {
        KernelKind::Decode => {
            let g = d.num_query_heads / d.num_kv_heads.max(1);
            let per_cta = (launch.heads_per_cta as usize).clamp(1, g.max(1));
            (
                decode_splits(d.max_kv_capacity, launch) as u32,
                (d.num_kv_heads * (g / per_cta)) as u32,
                b,
            )
        }
        KernelKind::Merge => (d.num_query_heads as u32, b, 1),
        KernelKind::Append => (d.num_kv_heads as u32, b, 1),
        KernelKind::Fill => (
            d.max_kv_capacity.div_ceil(launch.rows.max(1) as usize) as u32,
            d.num_kv_heads as u32,
            b,
        ),
        KernelKind::Prefill(_) => (
            d.prompt_len.div_ceil(launch.block_q.max(1) as usize).max(1) as u32,
            d.num_query_heads as u32,
            b,
        ),
    }
}

/// The block of a kind: `launch.threads` threads.
pub fn block(launch: &LaunchConfig) -> Dim3 {
    (launch.threads, 1, 1)
}

/// One argument value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A buffer's address (a host pointer on emu, a `CUdeviceptr` on cuda) and what it
    /// holds.
    Ptr(u64, Elem),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Packed arguments of one launch, in ABI order, checked against the kind's [`params`].
///
/// Every argument lives in its own 8-byte slot; a pointer is stored as its address,
/// 32-bit values in the slot's low bytes (little-endian), exactly what the kernel reads
/// through `*(T*)params[i]`. Both the emu and the cuda backend pass [`ArgPack::as_params`],
/// so the emu tests cover the packing the GPU path uses.
#[derive(Debug)]
pub struct ArgPack {
    slots: Vec<u64>,
    ptrs: Vec<*mut std::ffi::c_void>,
}

impl ArgPack {
    /// Packs named arguments for a kernel of `kind`: every parameter of [`params`] must
    /// be given exactly once, with its type; the order of `named` does not matter.
    pub fn new(kernel: &str, kind: KernelKind, named: &[(&str, Arg)]) -> Result<ArgPack> {
        ArgPack::with_params(kernel, &kind.slug(), params(kind), named)
    }

    /// Packs named arguments against any parameter table `sig` (the engine's ops have
    /// their own, [`crate::ops::Op::params`]); `what` names the kernel's kind in errors.
    pub fn with_params(
        kernel: &str,
        what: &str,
        sig: &[(&str, Param)],
        named: &[(&str, Arg)],
    ) -> Result<ArgPack> {
        let abi_err = |message: String| Error::Abi {
            kernel: kernel.to_string(),
            message,
        };
        if let Some((extra, _)) = named.iter().find(|(n, _)| !sig.iter().any(|(s, _)| s == n)) {
            return Err(abi_err(format!(
                "{what} kernels take no argument {extra:?}"
            )));
        }
        let mut slots = Vec::with_capacity(sig.len());
        for &(name, param) in sig {
            let mut given = named.iter().filter(|(n, _)| *n == name);
            let arg = match (given.next(), given.next()) {
                (Some((_, a)), None) => *a,
                (None, _) => return Err(abi_err(format!("argument {name} is missing"))),
                (Some(_), Some(_)) => return Err(abi_err(format!("argument {name} given twice"))),
            };
            let slot = match (param, arg) {
                (Param::ConstPtr(e) | Param::MutPtr(e), Arg::Ptr(addr, got)) if e == got => addr,
                (Param::I32, Arg::I32(v)) => v as u32 as u64,
                (Param::I64, Arg::I64(v)) => v as u64,
                (Param::F32, Arg::F32(v)) => v.to_bits() as u64,
                _ => {
                    return Err(abi_err(format!(
                        "argument {name} must be {param:?}, got {arg:?}"
                    )))
                }
            };
            slots.push(slot);
        }
        let mut pack = ArgPack {
            slots,
            ptrs: Vec::new(),
        };
        let base = pack.slots.as_mut_ptr();
        // Addresses of the slots; `slots` is never resized after this.
        pack.ptrs = (0..pack.slots.len())
            .map(|i| base.wrapping_add(i).cast())
            .collect();
        Ok(pack)
    }

    /// The `void**` array; valid while `self` lives.
    pub fn as_params(&mut self) -> *mut *mut std::ffi::c_void {
        self.ptrs.as_mut_ptr()
    }

    /// The raw slots, in ABI order.
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::PrefillMode;

    fn append_args() -> Vec<(&'static str, Arg)> {
        vec![
            ("v_new", Arg::Ptr(0x2000, Elem::Scalar)),
            ("slot", Arg::I32(5)),
            ("k_new", Arg::Ptr(0x1000, Elem::Scalar)),
            ("k_cache", Arg::Ptr(0x3000, Elem::Scalar)),
            ("v_cache", Arg::Ptr(0x4000, Elem::Scalar)),
            ("seq_lens", Arg::Ptr(0x5000, Elem::Int)),
            ("n", Arg::I64(-7)),
            ("batch", Arg::I32(-3)),
        ]
    }

    #[test]
    fn packs_by_name_in_abi_order_and_checks_types() {
        let args = append_args();
        let mut p = ArgPack::new("k", KernelKind::Append, &args).unwrap();
        assert_eq!(p.slots()[0] as u32 as i32, 5, "the slot comes first");
        assert_eq!(
            p.slots()[1],
            0x1000,
            "k_new before v_new whatever the given order"
        );
        assert_eq!(p.slots()[2], 0x2000);
        assert_eq!(p.slots()[5], 0x5000);
        assert_eq!(p.slots()[6], (-7i64) as u64);
        assert_eq!(p.slots()[7] as u32 as i32, -3);
        let params = p.as_params();
        // SAFETY: params points at 8 valid slot addresses owned by `p`.
        let last = unsafe { *(*params.add(7) as *const i32) };
        assert_eq!(last, -3);
        let mut bad = args.clone();
        bad[5].1 = Arg::Ptr(0x5000, Elem::Float);
        let e = ArgPack::new("k", KernelKind::Append, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("seq_lens"), "{e}");
        let e = ArgPack::new("k", KernelKind::Append, &args[1..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("v_new is missing"), "{e}");
        let mut twice = args.clone();
        twice.push(("n", Arg::I64(1)));
        assert!(ArgPack::new("k", KernelKind::Append, &twice).is_err());
        let mut extra = args.clone();
        extra.push(("scale", Arg::F32(1.0)));
        let e = ArgPack::new("k", KernelKind::Append, &extra)
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale"), "{e}");
        bad = args;
        bad[7].1 = Arg::I64(1);
        assert!(ArgPack::new("k", KernelKind::Append, &bad).is_err());
    }

    #[test]
    fn signatures_come_from_the_table() {
        for kind in KernelKind::ALL {
            let sig = entry_signature(kind);
            assert!(sig.starts_with("int slot,"), "{sig}");
            assert_eq!(sig.matches(',').count() + 1, params(kind).len());
            let body = body_args(kind);
            assert!(!body.contains("slot"));
            assert_eq!(body.matches(", ").count() + 2, params(kind).len());
        }
        assert!(entry_signature(KernelKind::Decode).contains("float* __restrict__ part_lse"));
        assert!(entry_signature(KernelKind::Prefill(PrefillMode::Token))
            .contains("const int* __restrict__ prompt_lens"));
    }

    #[test]
    fn grids() {
        let d = GridDims {
            batch: 3,
            prompt_len: 200,
            num_query_heads: 8,
            num_kv_heads: 2,
            max_kv_capacity: 1000,
        };
        let lc = |kind| LaunchConfig::default_for(kind, 128).resolved(kind, 4);
        let dec = lc(KernelKind::Decode);
        assert_eq!(grid(KernelKind::Decode, &dec, &d), (4, 2, 3));
        let two = LaunchConfig {
            heads_per_cta: 2,
            ..dec
        };
        assert_eq!(grid(KernelKind::Decode, &two, &d), (4, 4, 3));
        assert_eq!(
            grid(KernelKind::Merge, &lc(KernelKind::Merge), &d),
            (8, 3, 1)
        );
        assert_eq!(
            grid(KernelKind::Append, &lc(KernelKind::Append), &d),
            (2, 3, 1)
        );
        assert_eq!(
            grid(KernelKind::Fill, &lc(KernelKind::Fill), &d),
            (16, 2, 3)
        );
        let pf = KernelKind::Prefill(PrefillMode::Block64);
        assert_eq!(grid(pf, &lc(pf), &d), (4, 8, 3));
    }
}
