//! Kernel argument packing shared by the `emu` and `cuda` backends: both pass the same
//! `void** params` array (`cuLaunchKernel`'s convention), so the emu tests cover the
//! packing the GPU path uses.
//!
//! Every argument lives in its own 8-byte slot; a pointer is stored as its address (a
//! host pointer for emu, a `CUdeviceptr` for cuda), 32-bit values in the slot's low bytes
//! (little-endian), exactly what the kernel reads through `*(T*)params[i]`.

use crate::error::{Error, Result};
use moac::ir::{self, Elem, KernelKind, Param};

/// One argument value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A buffer's address (host or device) and what it holds.
    Ptr(u64, Elem),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Packed arguments of one launch, checked against the kernel's signature.
#[derive(Debug)]
pub struct ArgPack {
    slots: Vec<u64>,
    ptrs: Vec<*mut std::ffi::c_void>,
}

impl ArgPack {
    /// Packs `args` for a kernel of `kind`, checking count, order and types against
    /// the ABI (`moac::ir::params`).
    pub fn new(kernel: &str, kind: KernelKind, args: &[Arg]) -> Result<ArgPack> {
        let sig = ir::params(kind);
        if sig.len() != args.len() {
            return Err(Error::Backend(format!(
                "{kernel}: {} arguments given, the kernel takes {}",
                args.len(),
                sig.len()
            )));
        }
        let mut slots = Vec::with_capacity(args.len());
        for (&(name, param), arg) in sig.iter().zip(args) {
            let slot = match (param, *arg) {
                (Param::ConstPtr(e) | Param::MutPtr(e), Arg::Ptr(addr, got)) if e == got => addr,
                (Param::I32, Arg::I32(v)) => v as u32 as u64,
                (Param::I64, Arg::I64(v)) => v as u64,
                (Param::F32, Arg::F32(v)) => v.to_bits() as u64,
                _ => {
                    return Err(Error::Backend(format!(
                        "{kernel}: argument {name} must be {param:?}, got {arg:?}"
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

    /// The raw slots (for tests).
    pub fn slots(&self) -> &[u64] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_in_abi_order_and_checks_types() {
        let args = [
            Arg::I32(5),
            Arg::Ptr(0x1000, Elem::Scalar),
            Arg::Ptr(0x2000, Elem::Scalar),
            Arg::Ptr(0x3000, Elem::Scalar),
            Arg::Ptr(0x4000, Elem::Scalar),
            Arg::Ptr(0x5000, Elem::Int),
            Arg::I64(-7),
            Arg::I32(-3),
        ];
        let mut p = ArgPack::new("k", KernelKind::Append, &args).unwrap();
        assert_eq!(p.slots()[0] as u32 as i32, 5, "the slot comes first");
        assert_eq!(p.slots()[5], 0x5000);
        assert_eq!(p.slots()[6], (-7i64) as u64);
        assert_eq!(p.slots()[7] as u32 as i32, -3);
        let params = p.as_params();
        // SAFETY: params points at 8 valid slot addresses owned by `p`.
        let last = unsafe { *(*params.add(7) as *const i32) };
        assert_eq!(last, -3);
        let mut bad = args;
        bad[5] = Arg::Ptr(0x5000, Elem::Float);
        assert!(ArgPack::new("k", KernelKind::Append, &bad).is_err());
        assert!(ArgPack::new("k", KernelKind::Append, &args[..7]).is_err());
        assert!(ArgPack::new("k", KernelKind::Append, &args[1..]).is_err());
        bad = args;
        bad[7] = Arg::I64(1);
        assert!(ArgPack::new("k", KernelKind::Append, &bad).is_err());
    }
}
