//! Rust bindings for an artifact, generated with syn/quote and formatted with
//! prettyplease: the plan's geometry constants, every kernel's source and binaries
//! (embedded with `include_str!`/`include_bytes!`, paths relative to `bindings.rs`), and
//! one typed launch function per kernel over cudarc types.
//!
//! Use it with `mod moac_kernels { include!(concat!(env!("OUT_DIR"), "/artifact/bindings.rs")); }`;
//! the launch functions need `cudarc` (driver feature) in the including crate.

use super::manifest::Manifest;
use crate::abi::{self, Elem, Param};
use crate::error::{Error, Result};
use crate::ir::Lowered;
use crate::plan::ValidPlan;
use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote};

fn lit_f64(v: f64) -> Literal {
    Literal::f64_suffixed(v)
}

fn lit_u64(v: u64) -> Literal {
    Literal::u64_suffixed(v)
}

fn lit_usize(v: usize) -> Literal {
    Literal::usize_unsuffixed(v)
}

/// Generates `bindings.rs` for a manifest about to be written.
/// Building, parsing and formatting the tokens was most of a warm compile's time, so the
/// formatted text is cached by a hash of its inputs when `cache` is given.
pub(crate) fn generate(
    plan: &ValidPlan,
    lowered: &Lowered,
    manifest: &Manifest,
    cache: Option<&crate::jit::cache::Cache>,
) -> Result<String> {
    // The cache key hashes every input of the text (this generator's own source, moac's
    // version, the plan and the manifest), so a hit skips building the tokens at all.
    let key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for part in [
            include_str!("bindings.rs"),
            env!("CARGO_PKG_VERSION"),
            plan.name(),
            &plan.sha256(),
            &manifest.to_json()?,
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        format!("bindings-{}", crate::plan::hex(&h.finalize()))
    };
    if let Some(text) = cache.and_then(|c| c.get_text(&key)) {
        return Ok(text);
    }
    let m = plan.model();
    let s = plan.settings();
    let (nl, hq, hkv) = (
        lit_usize(m.num_layers),
        lit_usize(m.num_query_heads),
        lit_usize(m.num_kv_heads),
    );
    let head_dim = lit_usize(m.head_dim);
    let plan_sha = &manifest.plan_sha256;
    let dtype = manifest.dtype.name();
    let (sink, min_cap, gran) = (
        lit_u64(s.sink),
        lit_u64(s.min_capacity),
        lit_u64(s.granularity),
    );
    let alphas = plan.layers().map(|l| {
        let v = l.iter().map(|r| lit_f64(r.alpha));
        quote! { [#(#v),*] }
    });
    let betas = plan.layers().map(|l| {
        let v = l.iter().map(|r| lit_f64(r.beta));
        quote! { [#(#v),*] }
    });
    let fixed = match &lowered.geometry {
        Some(g) => {
            let n = lit_u64(g.n);
            let qc = g.layers.iter().map(|l| {
                let v = l.query_capacity.iter().map(|&c| lit_u64(c));
                quote! { [#(#v),*] }
            });
            let kc = g.layers.iter().map(|l| {
                let v = l.kv_capacity.iter().map(|&c| lit_u64(c));
                quote! { [#(#v),*] }
            });
            let ko = g.layers.iter().map(|l| {
                let v = l.kv_offset.iter().map(|&c| lit_u64(c));
                quote! { [#(#v),*] }
            });
            let ts = g.layers.iter().map(|l| lit_u64(l.total_slots));
            quote! {
                /// N this build is specialized to.
                pub const FIXED_N: Option<u64> = Some(#n);
                /// Capacity C of every query head, per layer.
                pub const QUERY_CAPACITY: [[u64; #hq]; #nl] = [#(#qc),*];
                /// Capacity of every KV head (max over its group), per layer.
                pub const KV_CAPACITY: [[u64; #hkv]; #nl] = [#(#kc),*];
                /// First slot of every KV head's region, per layer.
                pub const KV_OFFSET: [[u64; #hkv]; #nl] = [#(#ko),*];
                /// Slots per sequence, per layer.
                pub const TOTAL_SLOTS: [u64; #nl] = [#(#ts),*];
            }
        }
        None => quote! {
            /// N is a runtime value in this build (capacities follow from ALPHAS/BETAS).
            pub const FIXED_N: Option<u64> = None;
        },
    };

    // Every file once: kernels of one translation unit share its source and binaries.
    let mut files: Vec<(String, bool)> = Vec::new();
    let mut file_ident = |path: &str, binary: bool| {
        let i = match files.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                files.push((path.to_string(), binary));
                files.len() - 1
            }
        };
        format_ident!("FILE_{}", i)
    };
    let mut kernel_consts = Vec::new();
    let mut kernel_idents = Vec::new();
    let mut launchers = Vec::new();
    for (k, mk) in manifest.kernels.iter().enumerate() {
        let spec = &lowered.kernels[k];
        let ident = format_ident!("{}", mk.name.to_uppercase());
        let name = &mk.name;
        let entry = &mk.entry;
        let slot = mk.slot as i32;
        let kind = mk.kind.as_str();
        let src = file_ident(&mk.source, false);
        let threads = spec.launch.threads;
        let layers = mk.layers.iter().map(|&l| lit_usize(l));
        let ptx = match &mk.ptx {
            Some(p) => {
                let f = file_ident(p, false);
                quote! { Some(#f) }
            }
            None => quote! { None },
        };
        let cubins: Vec<TokenStream> = mk
            .cubin
            .iter()
            .map(|(arch, e)| {
                let f = file_ident(&e.path, true);
                quote! { (#arch, #f) }
            })
            .collect();
        kernel_consts.push(quote! {
            pub const #ident: Kernel = Kernel {
                name: #name,
                entry: #entry,
                slot: #slot,
                kind: #kind,
                layers: &[#(#layers),*],
                threads: #threads,
                source: #src,
                ptx: #ptx,
                cubins: &[#(#cubins),*],
            };
        });
        kernel_idents.push(ident);
        launchers.push(launcher(name, entry, slot, spec.kind));
    }
    let file_consts = files.iter().enumerate().map(|(i, (path, binary))| {
        let id = format_ident!("FILE_{}", i);
        if *binary {
            quote! { const #id: &[u8] = include_bytes!(#path); }
        } else {
            quote! { const #id: &str = include_str!(#path); }
        }
    });
    let layer_rows = lowered.layers.iter().map(|lk| {
        let l = lit_usize(lk.layer);
        let ids = [
            &lk.decode,
            &lk.merge,
            &lk.append,
            &lk.fill,
            &lk.prefill_block64,
            &lk.prefill_token,
        ]
        .map(|n| format_ident!("{}", n.to_uppercase()));
        let [d, mg, a, f, pb, pt] = ids;
        quote! {
            LayerKernels { layer: #l, decode: &#d, merge: &#mg, append: &#a, fill: &#f, prefill_block64: &#pb, prefill_token: &#pt }
        }
    });
    let file: TokenStream = quote! {
        /// SHA-256 of the plan (geometry, settings and rules).
        pub const PLAN_SHA256: &str = #plan_sha;
        /// Element type of K, V, Q and outputs: "f16" or "bf16".
        pub const DTYPE: &str = #dtype;
        pub const HEAD_DIM: usize = #head_dim;
        pub const NUM_LAYERS: usize = #nl;
        pub const NUM_QUERY_HEADS: usize = #hq;
        pub const NUM_KV_HEADS: usize = #hkv;
        pub const SINK: u64 = #sink;
        pub const MIN_CAPACITY: u64 = #min_cap;
        pub const GRANULARITY: u64 = #gran;
        /// alpha of every query head, per layer (S = alpha + beta * N).
        pub const ALPHAS: [[f64; #hq]; #nl] = [#(#alphas),*];
        /// beta of every query head, per layer.
        pub const BETAS: [[f64; #hq]; #nl] = [#(#betas),*];
        #fixed

        /// One compiled kernel: its source and binaries. Kernels of one kind share a
        /// translation unit with one entry point; `slot`, the entry's first argument,
        /// picks the kernel.
        #[derive(Debug, Clone, Copy)]
        pub struct Kernel {
            pub name: &'static str,
            /// The function to load from the module (`CudaModule::load_function`).
            pub entry: &'static str,
            pub slot: i32,
            /// decode, merge, append, fill or prefill.
            pub kind: &'static str,
            pub layers: &'static [usize],
            /// Threads per block of the launch configuration it was generated for.
            pub threads: u32,
            pub source: &'static str,
            /// PTX of the lowest compiled arch (JIT fallback); None for `--emit cuda`.
            pub ptx: Option<&'static str>,
            /// (arch, CUBIN) pairs, e.g. ("sm_90", ..).
            pub cubins: &'static [(&'static str, &'static [u8])],
        }

        impl Kernel {
            /// The CUBIN for an arch such as "sm_90", if one was built.
            pub fn cubin(&self, arch: &str) -> Option<&'static [u8]> {
                self.cubins.iter().find(|(a, _)| *a == arch).map(|(_, b)| *b)
            }
        }

        /// The kernels one layer uses.
        #[derive(Debug, Clone, Copy)]
        pub struct LayerKernels {
            pub layer: usize,
            pub decode: &'static Kernel,
            pub merge: &'static Kernel,
            pub append: &'static Kernel,
            pub fill: &'static Kernel,
            pub prefill_block64: &'static Kernel,
            pub prefill_token: &'static Kernel,
        }

        #(#file_consts)*

        #(#kernel_consts)*

        /// Every kernel of the artifact.
        pub const KERNELS: &[&Kernel] = &[#(&#kernel_idents),*];

        /// The compiled layers and their kernels.
        pub const LAYERS: &[LayerKernels] = &[#(#layer_rows),*];

        /// Typed launches over cudarc. `T` is the artifact's element type (a 2-byte
        /// f16 or bf16 type such as `half::f16`); pointers follow docs/kernel-abi.md.
        pub mod launch {
            #(#launchers)*
        }
    };
    let parsed: syn::File = syn::parse2(file)
        .map_err(|e| Error::Internal(format!("generated bindings do not parse: {e}")))?;
    let body = prettyplease::unparse(&parsed);
    let text = format!(
        "// generated by moac {}, do not edit\n// plan {} (sha256 {})\n{body}",
        env!("CARGO_PKG_VERSION"),
        plan.name(),
        plan_sha
    );
    if let Some(c) = cache {
        // A cache that cannot be written only costs the formatting next time.
        let _ = c.put_text(&key, &text);
    }
    Ok(text)
}

fn launcher(name: &str, entry: &str, slot: i32, kind: crate::ir::KernelKind) -> TokenStream {
    let f = format_ident!("{}", name);
    let mut args = Vec::new();
    let mut pushes = Vec::new();
    for &(pname, param) in abi::params(kind) {
        if pname == "slot" {
            pushes.push(quote! { builder.arg(&SLOT); });
            continue;
        }
        let id = format_ident!("{}", pname);
        let ty = match param {
            Param::ConstPtr(e) | Param::MutPtr(e) => {
                let elem = match e {
                    Elem::Scalar => quote! { T },
                    Elem::Float => quote! { f32 },
                    Elem::Int => quote! { i32 },
                };
                if matches!(param, Param::MutPtr(_)) {
                    quote! { &mut cudarc::driver::CudaSlice<#elem> }
                } else {
                    quote! { &cudarc::driver::CudaSlice<#elem> }
                }
            }
            Param::I32 => quote! { i32 },
            Param::I64 => quote! { i64 },
            Param::F32 => quote! { f32 },
        };
        args.push(quote! { #id: #ty });
        match param {
            Param::ConstPtr(_) | Param::MutPtr(_) => pushes.push(quote! { builder.arg(#id); }),
            _ => pushes.push(quote! { builder.arg(&#id); }),
        }
    }
    let doc = format!(
        " Launches `{name}` ({}) on `stream`: entry `{entry}`, slot {slot}.",
        kind.slug()
    );
    quote! {
        #[doc = #doc]
        ///
        /// # Safety
        /// `func` must be this kernel's entry loaded from this artifact, every buffer must have the
        /// shape docs/kernel-abi.md gives for these arguments, and `cfg` the grid it gives.
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn #f<T>(
            stream: &cudarc::driver::CudaStream,
            func: &cudarc::driver::CudaFunction,
            cfg: cudarc::driver::LaunchConfig,
            #(#args),*
        ) -> Result<(), cudarc::driver::DriverError> {
            use cudarc::driver::PushKernelArg;
            debug_assert_eq!(core::mem::size_of::<T>(), 2, "moac kernels take 2-byte elements");
            const SLOT: i32 = #slot;
            let mut builder = stream.launch_builder(func);
            #(#pushes)*
            // SAFETY: the caller upholds this function's contract (see above).
            unsafe { builder.launch(cfg) }.map(|_| ())
        }
    }
}
