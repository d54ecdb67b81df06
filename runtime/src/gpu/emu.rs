//! The `emu` side of [`Gpu`](super::Gpu): host memory standing in for device memory
//! ([`HostMem`]), copies on it, kernels' CUDA source built with g++ against the
//! emulation header, GEMMs by a CPU matmul with cuBLAS's contract (f16/bf16 inputs, f32
//! accumulation and output), and the wall clock for timing. Every call has finished
//! when it returns. [`Gpu`](super::Gpu) checks ranges and pairs each call with host
//! buffers before it gets here.

use super::GpuModule;
use crate::backend::emu::{EmuModule, EmuOptions};
use crate::error::{Error, Result};
use moac::geometry::Dtype;
use std::alloc::Layout;
use std::ptr::NonNull;

/// Host memory standing in for a device allocation (emu): zeroed, 64-byte aligned,
/// reached only through raw pointers while kernels run.
pub(super) struct HostMem {
    ptr: NonNull<u8>,
    layout: Layout,
    /// The bytes asked for (the allocation holds at least 64).
    len: usize,
}

// SAFETY: HostMem owns its allocation exclusively (like a Vec); accesses are sequenced
// by the Gpu's calls, which run one at a time.
unsafe impl Send for HostMem {}
// SAFETY: shared references only read the pointer value.
unsafe impl Sync for HostMem {}

impl HostMem {
    pub(super) fn new(bytes: usize) -> Result<HostMem> {
        let oom = || Error::OutOfMemory {
            what: "an emu buffer (host memory)".into(),
            bytes: bytes as u64,
        };
        let layout = Layout::from_size_align(bytes.max(64), 64).map_err(|_| oom())?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(oom)?;
        Ok(HostMem {
            ptr,
            layout,
            len: bytes,
        })
    }

    /// The address kernels see.
    pub(super) fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The bytes asked for, as a slice.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialised bytes; no kernel runs
        // while the view lives (calls on emu are synchronous and sequenced).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes the view the only one.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The emulated machine: how its modules are built.
pub(super) struct EmuGpu {
    opts: EmuOptions,
}

impl EmuGpu {
    pub(super) fn new(opts: EmuOptions) -> EmuGpu {
        EmuGpu { opts }
    }

    /// Copies `src` into `dst` at byte `off`.
    pub(super) fn upload(&self, dst: &mut HostMem, off: usize, src: &[u8]) {
        dst.bytes_mut()[off..off + src.len()].copy_from_slice(src);
    }

    /// Copies `dst.len()` bytes of `src` from byte `off`.
    pub(super) fn download(&self, src: &HostMem, off: usize, dst: &mut [u8]) {
        dst.copy_from_slice(&src.bytes()[off..off + dst.len()]);
    }

    /// Copies `bytes` bytes from `src` at `src_off` to `dst` at `dst_off`.
    pub(super) fn copy(
        &self,
        dst: &mut HostMem,
        dst_off: usize,
        src: &HostMem,
        src_off: usize,
        bytes: usize,
    ) {
        let tmp = src.bytes()[src_off..src_off + bytes].to_vec();
        dst.bytes_mut()[dst_off..dst_off + bytes].copy_from_slice(&tmp);
    }

    /// Copies row `from` to row `to`, each `row_bytes` long.
    pub(super) fn move_row(&self, buf: &mut HostMem, to: usize, from: usize, row_bytes: usize) {
        buf.bytes_mut()
            .copy_within(from * row_bytes..(from + 1) * row_bytes, to * row_bytes);
    }

    /// Repeats `pattern` over the whole buffer (whole patterns only).
    pub(super) fn fill(&self, buf: &mut HostMem, pattern: &[u8]) {
        for chunk in buf.bytes_mut().chunks_exact_mut(pattern.len()) {
            chunk.copy_from_slice(pattern);
        }
    }

    /// g++ against the emulation header.
    pub(super) fn module(&self, source: &str, entries: &[&str]) -> Result<GpuModule> {
        Ok(GpuModule::Emu(EmuModule::build(
            source, entries, &self.opts,
        )?))
    }

    /// y[m, n] = x[m, k] * w[n, k]^T + beta * y[m, n] on the CPU (rayon over the
    /// columns), element offsets as [`Gpu::gemm`](super::Gpu::gemm)'s, ranges checked
    /// by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        dtype: Dtype,
        y: &mut HostMem,
        y_off: usize,
        x: &HostMem,
        x_off: usize,
        w: &HostMem,
        w_off: usize,
        (m, n, k): (usize, usize, usize),
        beta: f32,
    ) {
        let (xs, ws) = (x.bytes(), w.bytes());
        let bits = |b: &[u8], at: usize| u16::from_le_bytes([b[2 * at], b[2 * at + 1]]);
        let xf: Vec<f32> = (0..m * k)
            .map(|i| dtype.from_bits(bits(xs, x_off + i)))
            .collect();
        let ys = y.bytes_mut();
        let yv: &mut [f32] = {
            let part = &mut ys[y_off * 4..(y_off + m * n) * 4];
            // SAFETY: the range is 4-byte aligned (64-byte aligned allocation,
            // offset in f32 elements) and holds m * n f32 values.
            unsafe { std::slice::from_raw_parts_mut(part.as_mut_ptr().cast(), m * n) }
        };
        let cols: Vec<(usize, Vec<f32>)> = {
            use rayon::prelude::*;
            (0..n)
                .into_par_iter()
                .map(|j| {
                    let wrow: Vec<f32> = (0..k)
                        .map(|t| dtype.from_bits(bits(ws, w_off + j * k + t)))
                        .collect();
                    let col = (0..m)
                        .map(|i| {
                            let xr = &xf[i * k..(i + 1) * k];
                            xr.iter().zip(&wrow).map(|(a, b)| a * b).sum::<f32>()
                        })
                        .collect();
                    (j, col)
                })
                .collect()
        };
        for (j, col) in cols {
            for (i, v) in col.into_iter().enumerate() {
                let o = &mut yv[i * n + j];
                *o = if beta == 0.0 { v } else { v + beta * *o };
            }
        }
    }

    /// Milliseconds `f` takes by the wall clock (its work is done when it returns).
    pub(super) fn time_ms<E>(&self, f: impl FnOnce() -> Result<(), E>) -> Result<f64, E> {
        let t = std::time::Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}
