//! The `cpu` reference backend, on candle-core: MoA attention written to be obviously
//! right rather than fast. Every function follows docs/semantics.md literally: masks come
//! from the predicates in [`semantics`], the cache is filled by writing positions
//! in order to their slots, decode gathers exactly the visible positions. Scores,
//! softmax and the weighted sum are computed in f32 from the stored (f16/bf16) values.

pub mod check;
pub mod semantics;

use crate::error::{Error, Result};
use crate::shape::LayerShape;
use candle_core::{DType, Device, IndexOp, Tensor};
use moac::ir::PrefillMode;
use semantics::{block64_sees, decode_sees, slot_of, token_sees};

/// One layer's compacted cache: K and V, each `[B, total_slots, D]` in the build dtype.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub k: Tensor,
    pub v: Tensor,
}

fn dims4(t: &Tensor, name: &str) -> Result<(usize, usize, usize, usize)> {
    match t.dims() {
        &[a, b, c, d] => Ok((a, b, c, d)),
        d => Err(Error::shape(name, "4 dimensions", format!("{d:?}"))),
    }
}

fn dims3(t: &Tensor, name: &str) -> Result<(usize, usize, usize)> {
    match t.dims() {
        &[a, b, c] => Ok((a, b, c)),
        d => Err(Error::shape(name, "3 dimensions", format!("{d:?}"))),
    }
}

/// Softmax attention of `q` [m, D] over `k`, `v` [n, D] with a mask [m, n] (true = seen).
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Vec<u8>,
    scale: f32,
) -> Result<Tensor> {
    let (m, n) = (q.dims()[0], k.dims()[0]);
    let scores = (q.matmul(&k.t()?)? * scale as f64)?;
    let mask = Tensor::from_vec(mask, (m, n), &Device::Cpu)?;
    let neg = Tensor::full(f32::NEG_INFINITY, (m, n), &Device::Cpu)?;
    let scores = mask.where_cond(&scores, &neg)?;
    let max = scores.max_keepdim(1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(1)?;
    let p = e.broadcast_div(&sum)?;
    Ok(p.matmul(v)?)
}

/// Sparse prefill attention. `q` [B,P,Hq,D], `k`/`v` [B,P,Hkv,D]; rows at or past a
/// row's prompt length are zero in the output [B,P,Hq,D] (f32).
pub fn prefill(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prompt_lens: &[usize],
    layer: &LayerShape,
    mode: PrefillMode,
    scale: f32,
) -> Result<Tensor> {
    let (b_, p_, hq, d) = dims4(q, "q")?;
    check_prompt(k, v, prompt_lens, layer, b_, p_)?;
    if hq != layer.num_query_heads || d != layer.head_dim {
        return Err(Error::shape(
            "q",
            format!(
                "[B,P,{},{}] for the layer",
                layer.num_query_heads, layer.head_dim
            ),
            format!("{:?}", q.dims()),
        ));
    }
    let g = layer.group_size();
    let mut out = vec![0f32; b_ * p_ * hq * d];
    for (b, &len) in prompt_lens.iter().enumerate() {
        if len == 0 {
            continue;
        }
        for h in 0..hq {
            let local = layer.query_local(h);
            let qh = q.i((b, 0..len, h))?.to_dtype(DType::F32)?;
            let kh = k.i((b, 0..len, h / g))?.to_dtype(DType::F32)?;
            let vh = v.i((b, 0..len, h / g))?.to_dtype(DType::F32)?;
            let mut mask = vec![0u8; len * len];
            for qi in 0..len {
                for ki in 0..len {
                    let seen = match mode {
                        PrefillMode::Block64 => block64_sees(qi, ki, layer.sink, local),
                        PrefillMode::Token => token_sees(qi, ki, layer.sink, local),
                    };
                    mask[qi * len + ki] = seen as u8;
                }
            }
            let oh = masked_attention(&qh, &kh, &vh, mask, scale)?.to_vec2::<f32>()?;
            for (qi, row) in oh.iter().enumerate() {
                let base = ((b * p_ + qi) * hq + h) * d;
                out[base..base + d].copy_from_slice(row);
            }
        }
    }
    Ok(Tensor::from_vec(out, (b_, p_, hq, d), &Device::Cpu)?)
}

fn check_prompt(
    k: &Tensor,
    v: &Tensor,
    prompt_lens: &[usize],
    layer: &LayerShape,
    b_: usize,
    p_: usize,
) -> Result<()> {
    let want = [b_, p_, layer.num_kv_heads, layer.head_dim];
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != want {
            return Err(Error::shape(
                name,
                format!("{want:?}"),
                format!("{:?}", t.dims()),
            ));
        }
    }
    if prompt_lens.len() != b_ {
        return Err(Error::shape(
            "prompt_lens",
            format!("{b_} rows"),
            prompt_lens.len(),
        ));
    }
    if let Some((b, &l)) = prompt_lens
        .iter()
        .enumerate()
        .find(|(_, &l)| l > p_.min(layer.n))
    {
        return Err(Error::shape(
            format!("prompt_lens[{b}]"),
            format!("at most {} (the padded length and N)", p_.min(layer.n)),
            l,
        ));
    }
    Ok(())
}

/// Fills a new cache from a prompt: positions are written in order to their slots, so
/// later positions overwrite earlier ones in the ring (semantics section 5). Slots never
/// written are zero.
pub fn fill(
    k: &Tensor,
    v: &Tensor,
    prompt_lens: &[usize],
    layer: &LayerShape,
) -> Result<LayerCache> {
    let (b_, p_, hkv, d) = dims4(k, "k")?;
    check_prompt(k, v, prompt_lens, layer, b_, p_)?;
    let dtype = k.dtype();
    let kf = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let vf = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let ct = layer.total_slots;
    let mut kc = vec![0f32; b_ * ct * d];
    let mut vc = vec![0f32; b_ * ct * d];
    for (b, &len) in prompt_lens.iter().enumerate() {
        for p in 0..len {
            for j in 0..hkv {
                let slot = layer.kv_offset[j] + slot_of(p, layer.sink, layer.kv_capacity[j]);
                let src = ((b * p_ + p) * hkv + j) * d;
                let dst = (b * ct + slot) * d;
                kc[dst..dst + d].copy_from_slice(&kf[src..src + d]);
                vc[dst..dst + d].copy_from_slice(&vf[src..src + d]);
            }
        }
    }
    Ok(LayerCache {
        k: Tensor::from_vec(kc, (b_, ct, d), &Device::Cpu)?.to_dtype(dtype)?,
        v: Tensor::from_vec(vc, (b_, ct, d), &Device::Cpu)?.to_dtype(dtype)?,
    })
}

/// Appends one token per row: `k_new`/`v_new` [B,Hkv,D] go to position `seq_lens[b]-1`
/// (`seq_lens` counts tokens held after this append).
pub fn append(
    cache: &mut LayerCache,
    k_new: &Tensor,
    v_new: &Tensor,
    seq_lens: &[usize],
    layer: &LayerShape,
) -> Result<()> {
    let (b_, hkv, d) = dims3(k_new, "k_new")?;
    if v_new.dims() != k_new.dims()
        || hkv != layer.num_kv_heads
        || d != layer.head_dim
        || seq_lens.len() != b_
    {
        return Err(Error::shape(
            "append k_new, v_new, seq_lens",
            format!(
                "[B,{},{}] twice and B rows",
                layer.num_kv_heads, layer.head_dim
            ),
            format!(
                "{:?}, {:?}, {} rows",
                k_new.dims(),
                v_new.dims(),
                seq_lens.len()
            ),
        ));
    }
    let ct = layer.total_slots;
    let dtype = cache.k.dtype();
    let mut kc = cache
        .k
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut vc = cache
        .v
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let kn = k_new
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let vn = v_new
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (b, &t) in seq_lens.iter().enumerate() {
        if t == 0 || t > layer.n {
            return Err(Error::CapacityExceeded {
                layer: layer.layer,
                row: b,
                tokens: t,
                n: layer.n,
            });
        }
        for j in 0..hkv {
            let slot = layer.kv_offset[j] + slot_of(t - 1, layer.sink, layer.kv_capacity[j]);
            let src = (b * hkv + j) * d;
            let dst = (b * ct + slot) * d;
            kc[dst..dst + d].copy_from_slice(&kn[src..src + d]);
            vc[dst..dst + d].copy_from_slice(&vn[src..src + d]);
        }
    }
    cache.k = Tensor::from_vec(kc, (b_, ct, d), &Device::Cpu)?.to_dtype(dtype)?;
    cache.v = Tensor::from_vec(vc, (b_, ct, d), &Device::Cpu)?.to_dtype(dtype)?;
    Ok(())
}

/// Decode attention of the newest token (`q` [B,Hq,D]) over the compacted cache, rows
/// holding `seq_lens[b]` tokens. Output [B,Hq,D] (f32).
pub fn decode(
    q: &Tensor,
    cache: &LayerCache,
    seq_lens: &[usize],
    layer: &LayerShape,
    scale: f32,
) -> Result<Tensor> {
    let (b_, hq, d) = dims3(q, "q")?;
    if hq != layer.num_query_heads || d != layer.head_dim || seq_lens.len() != b_ {
        return Err(Error::shape(
            "decode q, seq_lens",
            format!(
                "[B,{},{}] and B rows",
                layer.num_query_heads, layer.head_dim
            ),
            format!("{:?}, {} rows", q.dims(), seq_lens.len()),
        ));
    }
    let g = layer.group_size();
    let mut out = vec![0f32; b_ * hq * d];
    for (b, &t) in seq_lens.iter().enumerate() {
        if t == 0 {
            continue;
        }
        let kb = cache.k.i(b)?.to_dtype(DType::F32)?;
        let vb = cache.v.i(b)?.to_dtype(DType::F32)?;
        for h in 0..hq {
            let j = h / g;
            let local = layer.query_local(h);
            let slots: Vec<u32> = (0..t)
                .filter(|&p| decode_sees(t, layer.sink, local, p))
                .map(|p| (layer.kv_offset[j] + slot_of(p, layer.sink, layer.kv_capacity[j])) as u32)
                .collect();
            let idx = Tensor::from_vec(slots.clone(), slots.len(), &Device::Cpu)?;
            let kh = kb.index_select(&idx, 0)?;
            let vh = vb.index_select(&idx, 0)?;
            let qh = q.i((b, h))?.to_dtype(DType::F32)?.unsqueeze(0)?;
            let oh = masked_attention(&qh, &kh, &vh, vec![1u8; slots.len()], scale)?;
            let row = oh.flatten_all()?.to_vec1::<f32>()?;
            let base = (b * hq + h) * d;
            out[base..base + d].copy_from_slice(&row);
        }
    }
    Ok(Tensor::from_vec(out, (b_, hq, d), &Device::Cpu)?)
}
