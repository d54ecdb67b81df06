//! The arguments of every kernel kind, by name, from buffer addresses (host pointers on
//! emu, device pointers on cuda): the one place both GPU-shaped backends take them from.
//! [`moac::abi::ArgPack`] puts them in ABI order and checks them against the table;
//! nothing here knows the order.

use super::{BoundKernel, LayerShape};
use crate::error::Result;
use moac::abi::{Arg, ArgPack, Elem};

/// Named arguments of one launch.
pub type Named = Vec<(&'static str, Arg)>;

fn scalar(p: u64) -> Arg {
    Arg::Ptr(p, Elem::Scalar)
}

fn float(p: u64) -> Arg {
    Arg::Ptr(p, Elem::Float)
}

fn int(p: u64) -> Arg {
    Arg::Ptr(p, Elem::Int)
}

/// Packs a launch of `kernel`: its slot, then the named arguments.
pub fn pack(kernel: &BoundKernel, mut args: Named) -> Result<ArgPack> {
    args.push(("slot", Arg::I32(kernel.slot)));
    Ok(ArgPack::new(&kernel.name, kernel.kind, &args)?)
}

/// Buffers of a prefill launch.
pub struct PrefillBufs {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub o: u64,
    pub prompt_lens: u64,
}

pub fn prefill(s: &LayerShape, b: PrefillBufs, p: usize, scale: f32) -> Named {
    vec![
        ("q", scalar(b.q)),
        ("k", scalar(b.k)),
        ("v", scalar(b.v)),
        ("o", scalar(b.o)),
        ("prompt_lens", int(b.prompt_lens)),
        ("p_stride", Arg::I32(p as i32)),
        ("n", Arg::I64(s.n as i64)),
        ("scale", Arg::F32(scale)),
    ]
}

/// Buffers of a fill launch.
pub struct FillBufs {
    pub k: u64,
    pub v: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub prompt_lens: u64,
}

pub fn fill(s: &LayerShape, b: FillBufs, p: usize, batch: usize) -> Named {
    vec![
        ("k", scalar(b.k)),
        ("v", scalar(b.v)),
        ("k_cache", scalar(b.k_cache)),
        ("v_cache", scalar(b.v_cache)),
        ("prompt_lens", int(b.prompt_lens)),
        ("p_stride", Arg::I32(p as i32)),
        ("n", Arg::I64(s.n as i64)),
        ("batch", Arg::I32(batch as i32)),
    ]
}

/// Buffers of an append launch.
pub struct AppendBufs {
    pub k_new: u64,
    pub v_new: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub seq_lens: u64,
}

pub fn append(s: &LayerShape, b: AppendBufs, batch: usize) -> Named {
    vec![
        ("k_new", scalar(b.k_new)),
        ("v_new", scalar(b.v_new)),
        ("k_cache", scalar(b.k_cache)),
        ("v_cache", scalar(b.v_cache)),
        ("seq_lens", int(b.seq_lens)),
        ("n", Arg::I64(s.n as i64)),
        ("batch", Arg::I32(batch as i32)),
    ]
}

/// Buffers of a decode (split-KV) launch.
pub struct DecodeBufs {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub seq_lens: u64,
    pub part_o: u64,
    pub part_lse: u64,
}

pub fn decode(s: &LayerShape, b: DecodeBufs, batch: usize, nsplit: usize, scale: f32) -> Named {
    vec![
        ("q", scalar(b.q)),
        ("k_cache", scalar(b.k_cache)),
        ("v_cache", scalar(b.v_cache)),
        ("seq_lens", int(b.seq_lens)),
        ("part_o", float(b.part_o)),
        ("part_lse", float(b.part_lse)),
        ("n", Arg::I64(s.n as i64)),
        ("batch", Arg::I32(batch as i32)),
        ("nsplit", Arg::I32(nsplit as i32)),
        ("scale", Arg::F32(scale)),
    ]
}

/// Buffers of a merge launch.
pub struct MergeBufs {
    pub part_o: u64,
    pub part_lse: u64,
    pub out: u64,
}

pub fn merge(b: MergeBufs, batch: usize, nsplit: usize) -> Named {
    vec![
        ("part_o", float(b.part_o)),
        ("part_lse", float(b.part_lse)),
        ("out", scalar(b.out)),
        ("batch", Arg::I32(batch as i32)),
        ("nsplit", Arg::I32(nsplit as i32)),
    ]
}
