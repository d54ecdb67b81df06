//! The `emu` backend: the exact CUDA source moac emits, built with g++ against the
//! emulation header `runtime/emu/moac_emu.h` ([`moac::jit::gxx`], cached like NVRTC's
//! results) and run on the CPU, with the same grids, arguments and buffer layouts as the
//! `cuda` backend (docs/kernel-abi.md). Every output buffer is poisoned (NaN) before a
//! launch, so an element a kernel fails to write shows up as a wrong number.

use super::launch::{self, AppendBufs, DecodeBufs, FillBufs, MergeBufs, PrefillBufs};
use super::{check_prompt, check_steps, kernel_of, BoundKernel, HostCache};
use super::{LayerBackend, LayerSetup, LayerShape, Prompt};
use crate::error::{expect_len, Error, Result};
use moac::abi::{self, ArgPack, Dim3};
use moac::geometry::Dtype;
use moac::ir::{KernelKind, PrefillMode};
use moac::jit::cache::Cache;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How emu modules are built (`sanitize`: with ASan/UBSan).
pub use moac::jit::gxx::GxxOptions as EmuOptions;

/// The emulation header, compiled into the runtime.
pub const HEADER: &str = include_str!("../../emu/moac_emu.h");

/// The cache emu modules are built into: `MOAC_EMU_CACHE`, else the compile cache.
pub fn cache() -> Cache {
    match std::env::var_os("MOAC_EMU_CACHE") {
        Some(d) => Cache::new(PathBuf::from(d)),
        None => Cache::new(Cache::default_root()),
    }
}

type LaunchFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    *mut *mut c_void,
    *mut std::ffi::c_char,
    usize,
) -> i32;

/// A loaded emu module (one translation unit).
pub struct EmuModule {
    lib: libloading::Library,
    path: PathBuf,
}

impl std::fmt::Debug for EmuModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuModule")
            .field("path", &self.path)
            .finish()
    }
}

fn sanitizer_loaded() -> bool {
    std::env::var("LD_PRELOAD")
        .unwrap_or_default()
        .contains("libasan")
}

impl EmuModule {
    /// Builds (or finds in the cache) and loads the module of `source` with launch
    /// entries for `entries`.
    pub fn build(source: &str, entries: &[&str], opts: &EmuOptions) -> Result<EmuModule> {
        if opts.sanitize && !sanitizer_loaded() {
            return Err(Error::Unavailable(
                "sanitized emu modules must run in a process with the ASan runtime loaded first: run with LD_PRELOAD=\"$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)\" ASAN_OPTIONS=detect_leaks=0".into(),
            ));
        }
        let so = moac::jit::gxx::build(source, entries, HEADER, opts, &cache())?;
        EmuModule::load(&so)
    }

    fn load(so: &Path) -> Result<EmuModule> {
        // SAFETY: the library was built by moac from generated kernel source and the emu
        // header (verified against its cache entry's SHA-256); its initialisers only set
        // up the emulator's static state.
        let lib = unsafe { libloading::Library::new(so) }.map_err(|e| Error::Toolchain {
            tool: "dlopen".into(),
            log: format!("cannot load {}: {e}", so.display()),
        })?;
        Ok(EmuModule {
            lib,
            path: so.to_path_buf(),
        })
    }

    /// Runs `entry` over `grid` x `block` with packed arguments.
    pub fn launch(&self, entry: &str, grid: Dim3, block: Dim3, args: &mut ArgPack) -> Result<()> {
        let symbol = format!("moac_emu_launch_{entry}\0");
        // SAFETY: the symbol is the C-ABI entry MOAC_EMU_ENTRY defines, with this signature.
        let f: libloading::Symbol<LaunchFn> =
            unsafe { self.lib.get(symbol.as_bytes()) }.map_err(|e| Error::Toolchain {
                tool: "emu".into(),
                log: format!("{}: no entry {entry}: {e}", self.path.display()),
            })?;
        let mut err = vec![0u8; 4096];
        // SAFETY: `args` holds one valid slot per kernel parameter, checked against the
        // kernel's ABI when it was packed; buffers behind pointer arguments are owned by
        // the caller and sized per docs/kernel-abi.md (the callers check shapes).
        let rc = unsafe {
            f(
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                args.as_params(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if rc != 0 {
            let msg = String::from_utf8_lossy(
                &err[..err.iter().position(|&c| c == 0).unwrap_or(err.len())],
            )
            .into_owned();
            return Err(Error::Toolchain {
                tool: "emu".into(),
                log: format!("launch of {entry} failed ({rc}): {msg}"),
            });
        }
        Ok(())
    }
}

/// A layer's kernels, built for the emu engine, with its cache.
pub struct EmuLayer {
    shape: LayerShape,
    dtype: Dtype,
    cache: HostCache,
    /// The bound kernels with their module and entry point.
    kernels: Vec<(BoundKernel, (Arc<EmuModule>, String))>,
}

/// The address of a buffer the kernel reads.
fn addr<T>(v: &[T]) -> u64 {
    v.as_ptr() as u64
}

/// A pointer the kernel writes through: taken from a mutable borrow.
fn addr_mut<T>(v: &mut [T]) -> u64 {
    v.as_mut_ptr() as u64
}

impl EmuLayer {
    /// Builds the emu modules of one layer from its kernels' translation units.
    pub fn new(setup: &LayerSetup, opts: &EmuOptions) -> Result<EmuLayer> {
        let mut modules: Vec<(usize, Arc<EmuModule>)> = Vec::new();
        let mut kernels = Vec::new();
        for k in super::bind_layer(setup.kernels, setup.specs, setup.units)? {
            let u = &setup.units[k.unit];
            let m = match modules.iter().find(|(i, _)| *i == k.unit) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = Arc::new(EmuModule::build(&u.source, &[u.name.as_str()], opts)?);
                    modules.push((k.unit, m.clone()));
                    m
                }
            };
            kernels.push((k, (m, u.name.clone())));
        }
        Ok(EmuLayer {
            shape: setup.shape.clone(),
            dtype: setup.dtype,
            cache: HostCache {
                batch: 0,
                k: Vec::new(),
                v: Vec::new(),
            },
            kernels,
        })
    }

    /// Launches the layer's kernel of `kind` with named arguments.
    fn run(&self, kind: KernelKind, batch: usize, p: usize, args: launch::Named) -> Result<()> {
        let (k, (module, entry)) = kernel_of(&self.kernels, kind)?;
        let mut pack = launch::pack(k, args)?;
        let grid = abi::grid(kind, &k.launch, &self.shape.grid_dims(batch, p));
        module.launch(entry, grid, abi::block(&k.launch), &mut pack)
    }

    fn nsplit(&self) -> Result<usize> {
        let (k, _) = kernel_of(&self.kernels, KernelKind::Decode)?;
        Ok(abi::decode_splits(self.shape.max_kv_capacity(), &k.launch))
    }

    fn check_cache(&self, batch: usize) -> Result<()> {
        let n = self.shape.cache_elems(batch);
        let what = "[B,total_slots,D] for the batch";
        expect_len("cache K", what, n, self.cache.k.len())?;
        expect_len("cache V", what, n, self.cache.v.len())
    }
}

impl LayerBackend for EmuLayer {
    fn shape(&self) -> &LayerShape {
        &self.shape
    }

    fn new_cache(&mut self, batch: usize) -> Result<()> {
        let n = self.shape.cache_elems(batch);
        self.cache = HostCache {
            batch,
            k: vec![self.dtype.nan_bits(); n],
            v: vec![self.dtype.nan_bits(); n],
        };
        Ok(())
    }

    fn prefill(&self, q: &[u16], pr: &Prompt, mode: PrefillMode, scale: f32) -> Result<Vec<f32>> {
        check_prompt(&self.shape, Some(q), pr)?;
        let b = pr.lens.len();
        let mut o = vec![self.dtype.nan_bits(); q.len()];
        let bufs = PrefillBufs {
            q: addr(q),
            k: addr(pr.k),
            v: addr(pr.v),
            o: addr_mut(&mut o),
            prompt_lens: addr(pr.lens),
        };
        let args = launch::prefill(&self.shape, bufs, pr.p, scale);
        self.run(KernelKind::Prefill(mode), b, pr.p, args)?;
        Ok(self.dtype.f32_of(&o))
    }

    fn fill(&mut self, pr: &Prompt) -> Result<()> {
        check_prompt(&self.shape, None, pr)?;
        let b = pr.lens.len();
        self.check_cache(b)?;
        let bufs = FillBufs {
            k: addr(pr.k),
            v: addr(pr.v),
            k_cache: addr_mut(&mut self.cache.k),
            v_cache: addr_mut(&mut self.cache.v),
            prompt_lens: addr(pr.lens),
        };
        let args = launch::fill(&self.shape, bufs, pr.p, b);
        self.run(KernelKind::Fill, b, pr.p, args)
    }

    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()> {
        let s = &self.shape;
        let b = seq_lens.len();
        self.check_cache(b)?;
        let kv = b * s.num_kv_heads * s.head_dim;
        expect_len("k_new", "[B,Hkv,D]", kv, k_new.len())?;
        expect_len("v_new", "[B,Hkv,D]", kv, v_new.len())?;
        check_steps(s, seq_lens)?;
        let bufs = AppendBufs {
            k_new: addr(k_new),
            v_new: addr(v_new),
            k_cache: addr_mut(&mut self.cache.k),
            v_cache: addr_mut(&mut self.cache.v),
            seq_lens: addr(seq_lens),
        };
        let args = launch::append(&self.shape, bufs, b);
        self.run(KernelKind::Append, b, 0, args)
    }

    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>> {
        let s = &self.shape;
        let b = seq_lens.len();
        self.check_cache(b)?;
        expect_len("q", "[B,Hq,D]", b * s.num_query_heads * s.head_dim, q.len())?;
        check_steps(s, seq_lens)?;
        let nsplit = self.nsplit()?;
        let mut part_o = vec![f32::NAN; b * s.num_query_heads * nsplit * s.head_dim];
        let mut part_lse = vec![f32::NAN; b * s.num_query_heads * nsplit];
        let bufs = DecodeBufs {
            q: addr(q),
            k_cache: addr(&self.cache.k),
            v_cache: addr(&self.cache.v),
            seq_lens: addr(seq_lens),
            part_o: addr_mut(&mut part_o),
            part_lse: addr_mut(&mut part_lse),
        };
        let args = launch::decode(s, bufs, b, nsplit, scale);
        self.run(KernelKind::Decode, b, 0, args)?;
        let mut out = vec![self.dtype.nan_bits(); q.len()];
        let bufs = MergeBufs {
            part_o: addr(&part_o),
            part_lse: addr(&part_lse),
            out: addr_mut(&mut out),
        };
        self.run(KernelKind::Merge, b, 0, launch::merge(bufs, b, nsplit))?;
        Ok(self.dtype.f32_of(&out))
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        Ok(self.cache.clone())
    }
}
