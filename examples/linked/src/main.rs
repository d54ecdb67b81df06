//! Links moac's generated bindings into an ordinary Rust program: the geometry constants,
//! the embedded kernels and the typed cudarc launch functions all come from `bindings.rs`.

#[allow(dead_code, clippy::all, clippy::unwrap_used)]
mod moac_kernels {
    include!(concat!(env!("OUT_DIR"), "/artifact/bindings.rs"));
}

fn main() {
    use moac_kernels as k;
    println!(
        "plan {}: {} layers x {} query heads / {} KV heads, head_dim {}, {}",
        &k::PLAN_SHA256[..12],
        k::NUM_LAYERS,
        k::NUM_QUERY_HEADS,
        k::NUM_KV_HEADS,
        k::HEAD_DIM,
        k::DTYPE
    );
    for layer in k::LAYERS {
        println!(
            "layer {}: decode {} (alpha[0] = {}, beta[0] = {})",
            layer.layer,
            layer.decode.name,
            k::ALPHAS[layer.layer][0],
            k::BETAS[layer.layer][0]
        );
    }
    for kernel in k::KERNELS {
        let cubin = kernel.cubin("sm_90").map(|b| b.len()).unwrap_or(0);
        println!(
            "  {:<40} {:<8} entry {} slot {:>2}, source {:>6} B, sm_90 CUBIN {:>6} B, PTX {}",
            kernel.name,
            kernel.kind,
            kernel.entry,
            kernel.slot,
            kernel.source.len(),
            cubin,
            if kernel.ptx.is_some() { "yes" } else { "no" }
        );
    }
    // The typed launch functions in `k::launch` are generic over the element type; the
    // compiler type-checks them against cudarc's API as part of this crate.
}
