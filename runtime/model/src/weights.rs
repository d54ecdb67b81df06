//! Where a model's weights come from: a GGUF file (moac's checked header reader,
//! [`crate::gguf`], then candle reads the tensor data; quantized matrices of any type
//! candle's quantized matmul takes: Q4_0, Q4_1, Q8_0, K-quants, F16, F32) or a Hugging
//! Face folder (`config.json` and `*.safetensors`, f32/f16/bf16, held as
//! f32). Both give the same [`Weights`]; the GGUF names and the Hugging Face names map
//! onto one layer structure. [`Llama::load`] is the loader: this file depends on
//! [`crate::llama`] (the model's types), never the other way.

use crate::gguf::GgufMetadata;
use crate::llama::{Layer, Llama, LlamaConfig, RopeStyle, Weights};
use crate::quant::{Linear, QuantMatrix};
use crate::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An opened model: a GGUF file or a Hugging Face folder.
pub enum WeightsSource {
    Gguf {
        meta: GgufMetadata,
        file: std::fs::File,
    },
    Hf {
        dir: PathBuf,
        config: serde_json::Value,
        tensors: HashMap<String, Tensor>,
    },
}

/// The tensor types moac reads from GGUF files (block types candle's CPU quantized
/// matmul implements, plus plain floats).
const GGUF_TYPES: [GgmlDType; 11] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// How GGUF matrices are held for the CPU matmuls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightMode {
    /// `native` (a GGUF file's own block types; Hugging Face weights are f32 in every
    /// mode).
    #[default]
    Auto,
    /// Dequantized to f32: exact products, 4 bytes a weight.
    F32,
    /// Block types without a fast CPU kernel (Q5_0, Q5_1) re-quantized to Q8_0, which
    /// moac's kernels run; others as in `native`.
    Q8,
    /// The file's own types, as they are: Q4_0, Q4_1 and Q8_0 through moac's kernels
    /// ([`crate::quant`]: activations rounded to 8 bits for one input row, dequantized
    /// f32 products for a prompt, the LM head with unrounded inputs), other block types
    /// through candle's quantized matmul.
    Native,
}

impl std::str::FromStr for WeightMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(WeightMode::Auto),
            "f32" => Ok(WeightMode::F32),
            "q8" => Ok(WeightMode::Q8),
            "native" => Ok(WeightMode::Native),
            _ => Err(format!("unknown weight mode {s:?} (auto, f32, q8, native)")),
        }
    }
}

impl std::fmt::Display for WeightMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightMode::Auto => "auto",
            WeightMode::F32 => "f32",
            WeightMode::Q8 => "q8",
            WeightMode::Native => "native",
        })
    }
}

/// Block types re-quantized to Q8_0 in `q8` mode.
const SLOW_ON_CPU: [GgmlDType; 2] = [GgmlDType::Q5_0, GgmlDType::Q5_1];

fn format_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The configuration of a GGUF file or a Hugging Face folder, reading only metadata /
/// `config.json` (no weights).
pub fn model_config(path: &Path) -> Result<LlamaConfig> {
    if path.is_dir() {
        let file = path.join("config.json");
        return hf_config(&file, &read_json(&file)?);
    }
    gguf_config(&GgufMetadata::read(path)?)
}

/// The configuration and the MLP width of a model, from a Hugging Face `config.json`
/// (the file or its folder) or a GGUF file's header: what `--shape` builds random
/// weights for.
pub fn model_shape(path: &Path) -> Result<(LlamaConfig, usize)> {
    let json = if path.is_dir() {
        Some(path.join("config.json"))
    } else if path.extension().is_some_and(|e| e == "json") {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(file) = json {
        let c = read_json(&file)?;
        let config = hf_config(&file, &c)?;
        let ff = c
            .get("intermediate_size")
            .and_then(|v| v.as_u64())
            .filter(|&v| v > 0)
            .ok_or_else(|| Error::Metadata {
                path: file.clone(),
                key: "intermediate_size".into(),
                message: "missing or not a positive integer".into(),
            })?;
        check_weight_count(&file, &config, ff)?;
        return Ok((config, ff as usize));
    }
    let meta = GgufMetadata::read(path)?;
    let config = gguf_config(&meta)?;
    let ff = meta
        .get("llama.feed_forward_length")
        .and_then(|v| v.to_u64().ok())
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Metadata {
            path: path.to_path_buf(),
            key: "llama.feed_forward_length".into(),
            message: "missing or not a positive integer".into(),
        })?;
    check_weight_count(path, &config, ff)?;
    Ok((config, ff as usize))
}

/// The most weights a configuration read for random weights (`--shape`) may ask for:
/// 2^36 (256 GiB in f32), far beyond what fits; a bound so a corrupt header cannot ask
/// for an allocation whose size overflows.
pub const MAX_RANDOM_WEIGHTS: u64 = 1 << 36;

fn check_weight_count(path: &Path, c: &LlamaConfig, ff: u64) -> Result<()> {
    let (h, q, kv) = (
        c.hidden as u64,
        (c.num_heads * c.head_dim) as u64,
        (c.num_kv_heads * c.head_dim) as u64,
    );
    let count = (|| {
        let per_layer = h
            .checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?
            .checked_add(ff.checked_mul(3)?.checked_mul(h)?)?
            .checked_add(h.checked_mul(2)?)?;
        per_layer
            .checked_mul(c.num_layers as u64)?
            .checked_add((c.vocab_size as u64).checked_mul(h)?)?
            .checked_add(h)
    })();
    match count {
        Some(n) if n <= MAX_RANDOM_WEIGHTS => Ok(()),
        _ => Err(Error::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "{} layers, hidden {}, MLP width {ff}, vocabulary {}: more than {MAX_RANDOM_WEIGHTS} weights",
                c.num_layers, c.hidden, c.vocab_size
            ),
        }),
    }
}

/// Reads a JSON file of a model folder.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| {
        format_err(
            path,
            format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    })
}

impl WeightsSource {
    /// Opens a GGUF file or a Hugging Face folder (told apart by the path: a folder, or
    /// a file).
    pub fn open(path: &Path) -> Result<WeightsSource> {
        if path.is_dir() {
            let config = read_json(&path.join("config.json"))?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(format_err(path, "no *.safetensors files in the folder"));
            }
            let mut tensors = HashMap::new();
            for f in files {
                let t = candle_core::safetensors::load(&f, &Device::Cpu)
                    .map_err(|e| format_err(&f, format!("not a readable safetensors file: {e}")))?;
                tensors.extend(t);
            }
            return Ok(WeightsSource::Hf {
                dir: path.to_path_buf(),
                config,
                tensors,
            });
        }
        let meta = GgufMetadata::read(path)?;
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(WeightsSource::Gguf { meta, file })
    }

    /// The file or folder.
    pub fn path(&self) -> &Path {
        match self {
            WeightsSource::Gguf { meta, .. } => meta.path(),
            WeightsSource::Hf { dir, .. } => dir,
        }
    }

    /// The model's configuration, from GGUF metadata or `config.json`.
    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            WeightsSource::Gguf { meta, .. } => gguf_config(meta),
            WeightsSource::Hf { dir, config, .. } => hf_config(&dir.join("config.json"), config),
        }
    }
}

fn gguf_config(meta: &GgufMetadata) -> Result<LlamaConfig> {
    let path = meta.path();
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            message: format!("architecture {arch:?} (moac runs llama)"),
        });
    }
    let key = |k: &str| format!("llama.{k}");
    let num_heads = meta.u32(&key("attention.head_count"))? as usize;
    let hidden = meta.u32(&key("embedding_length"))? as usize;
    if num_heads == 0 || !hidden.is_multiple_of(num_heads) {
        return Err(Error::Metadata {
            path: path.to_path_buf(),
            key: key("attention.head_count"),
            message: format!("{num_heads} heads do not divide the hidden size {hidden}"),
        });
    }
    let vocab_size = match meta.get("tokenizer.ggml.tokens") {
        Some(_) => meta.strings("tokenizer.ggml.tokens")?.len(),
        None => meta.u32(&key("vocab_size"))? as usize,
    };
    let config = LlamaConfig {
        num_layers: meta.u32(&key("block_count"))? as usize,
        hidden,
        num_heads,
        num_kv_heads: meta
            .opt_u32(&key("attention.head_count_kv"))?
            .map_or(num_heads, |v| v as usize),
        head_dim: hidden / num_heads,
        vocab_size,
        rope_theta: meta.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
        rms_eps: meta
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        context_len: meta
            .opt_u32(&key("context_length"))?
            .map_or(4096, |v| v as usize),
        rope: RopeStyle::Interleaved,
    };
    check_config(path, &config)?;
    Ok(config)
}

fn hf_config(path: &Path, c: &serde_json::Value) -> Result<LlamaConfig> {
    let model_type = c.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if model_type != "llama" {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            message: format!("model_type {model_type:?} (moac runs llama)"),
        });
    }
    let num = |key: &str| -> Result<usize> {
        let v = c.get(key).filter(|v| !v.is_null());
        v.and_then(|v| v.as_u64())
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| Error::Metadata {
                path: path.to_path_buf(),
                key: key.into(),
                message: match v {
                    None => "missing".into(),
                    Some(v) => format!("expected a non-negative integer, found {v}"),
                },
            })
    };
    // An optional key: absent (or null) takes the default, a present value must be of
    // the right type.
    let present = |key: &str| c.get(key).filter(|v| !v.is_null()).is_some();
    let opt_num = |key: &str, default: usize| -> Result<usize> {
        if present(key) {
            num(key)
        } else {
            Ok(default)
        }
    };
    let float = |key: &str, default: f64| -> Result<f32> {
        match c.get(key).filter(|v| !v.is_null()) {
            None => Ok(default as f32),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(|x| x as f32)
                .ok_or_else(|| Error::Metadata {
                    path: path.to_path_buf(),
                    key: key.into(),
                    message: format!("expected a number, found {v}"),
                }),
        }
    };
    if let Some(s) = c.get("rope_scaling").filter(|v| !v.is_null()) {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            message: format!("rope_scaling {s} (moac applies plain RoPE)"),
        });
    }
    let hidden = num("hidden_size")?;
    let num_heads = num("num_attention_heads")?;
    if num_heads == 0 {
        return Err(Error::Metadata {
            path: path.to_path_buf(),
            key: "num_attention_heads".into(),
            message: "0 heads".into(),
        });
    }
    let config = LlamaConfig {
        num_layers: num("num_hidden_layers")?,
        hidden,
        num_heads,
        num_kv_heads: opt_num("num_key_value_heads", num_heads)?,
        head_dim: opt_num("head_dim", hidden / num_heads)?,
        vocab_size: num("vocab_size")?,
        rope_theta: float("rope_theta", 10000.0)?,
        rms_eps: float("rms_norm_eps", 1e-5)?,
        context_len: opt_num("max_position_embeddings", 4096)?,
        rope: RopeStyle::HalfSplit,
    };
    check_config(path, &config)?;
    Ok(config)
}

/// The largest figures a configuration may give (far beyond any real model).
const MAX_LAYERS: usize = 4096;
const MAX_HEADS: usize = 1 << 16;
const MAX_HEAD_DIM: usize = 1 << 16;
const MAX_HIDDEN: usize = 1 << 20;
const MAX_VOCAB: usize = 1 << 24;

fn check_config(path: &Path, c: &LlamaConfig) -> Result<()> {
    let bad = |message: String| Error::Unsupported {
        path: path.to_path_buf(),
        message,
    };
    if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
        return Err(bad(format!(
            "{} query heads are not a multiple of {} KV heads",
            c.num_heads, c.num_kv_heads
        )));
    }
    if !c.head_dim.is_multiple_of(2) || c.num_layers == 0 {
        return Err(bad(format!(
            "head_dim {} / {} layers (RoPE needs an even head_dim, and a model a layer)",
            c.head_dim, c.num_layers
        )));
    }
    // Figures no model comes near: a corrupt file, caught before anything is sized by
    // them.
    for (what, value, max) in [
        ("layers", c.num_layers, MAX_LAYERS),
        ("query heads", c.num_heads, MAX_HEADS),
        ("head_dim", c.head_dim, MAX_HEAD_DIM),
        ("hidden size", c.hidden, MAX_HIDDEN),
        ("vocabulary size", c.vocab_size, MAX_VOCAB),
    ] {
        if value > max {
            return Err(bad(format!(
                "{value} {what}: more than the {max} moac takes"
            )));
        }
    }
    if c.vocab_size == 0 || c.context_len == 0 || c.hidden == 0 {
        return Err(bad(format!(
            "vocabulary size {}, context length {}, hidden size {}: none may be 0",
            c.vocab_size, c.context_len, c.hidden
        )));
    }
    if !(c.rms_eps >= 0.0 && c.rope_theta > 0.0) {
        return Err(bad(format!(
            "rms_eps {} / rope_theta {}: RMSNorm needs eps >= 0, RoPE theta > 0",
            c.rms_eps, c.rope_theta
        )));
    }
    Ok(())
}

impl Llama {
    /// Loads a GGUF file or a Hugging Face model folder. `mode`: how GGUF matrices
    /// are held (f32 gives exact products; candle's quantized CPU matmul rounds the
    /// activations to 8 bits, which moves logits by a few tenths).
    pub fn load(path: &Path, mode: WeightMode) -> Result<Llama> {
        let mut src = WeightsSource::open(path)?;
        let config = src.config()?;
        let w = Weights::read(&mut src, &config, mode)?;
        Llama::from_weights(config, w)
    }
}

impl Weights {
    /// The weights of `src`. GGUF llama files hold Q/K rows permuted for interleaved
    /// RoPE; a Hugging Face folder keeps HF's order (half-split RoPE): the config's
    /// `rope` says which.
    pub fn read(src: &mut WeightsSource, c: &LlamaConfig, mode: WeightMode) -> Result<Weights> {
        let path = src.path().to_path_buf();
        match src {
            WeightsSource::Gguf { meta, file } => {
                let mode = match mode {
                    WeightMode::Auto => WeightMode::Native,
                    m => m,
                };
                read_gguf(&path, meta, file, c, mode)
            }
            WeightsSource::Hf {
                config, tensors, ..
            } => read_hf(&path, config, tensors, c),
        }
    }
}

/// Reads named tensors of one GGUF file, checking type and shape.
struct GgufReader<'a> {
    path: &'a Path,
    content: &'a candle_core::quantized::gguf_file::Content,
    file: &'a mut std::fs::File,
    mode: WeightMode,
}

impl GgufReader<'_> {
    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<candle_core::quantized::QTensor> {
        let path = self.path;
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| format_err(path, format!("tensor {name} is missing")))?;
        if !GGUF_TYPES.contains(&info.ggml_dtype) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {name} has type {:?} (moac reads {:?})",
                    info.ggml_dtype, GGUF_TYPES
                ),
            });
        }
        // The header reader gives the dimensions outermost first, like a tensor's shape.
        let got = info.shape.dims();
        if got != shape {
            return Err(format_err(
                path,
                format!("tensor {name} has shape {got:?}, the config asks for {shape:?}"),
            ));
        }
        self.content
            .tensor(self.file, name, &Device::Cpu)
            .map_err(|e| format_err(path, format!("tensor {name}: {e}")))
    }

    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<Linear> {
        let t = self.qtensor(name, &[rows, cols])?;
        let path = self.path;
        let err = |e: candle_core::Error| format_err(path, format!("{name}: {e}"));
        let quant = |t: &candle_core::quantized::QTensor| -> Result<Option<Linear>> {
            Ok(QuantMatrix::from_qtensor(t)
                .map_err(|e| format_err(path, format!("{name}: {e}")))?
                .map(Linear::Quant))
        };
        match self.mode {
            WeightMode::F32 | WeightMode::Auto => {
                Ok(QMatMul::Tensor(t.dequantize(&Device::Cpu).map_err(err)?).into())
            }
            WeightMode::Q8 if SLOW_ON_CPU.contains(&t.dtype()) => {
                let f = t.dequantize(&Device::Cpu).map_err(err)?;
                let q =
                    candle_core::quantized::QTensor::quantize(&f, GgmlDType::Q8_0).map_err(err)?;
                match quant(&q)? {
                    Some(l) => Ok(l),
                    None => Ok(QMatMul::from_qtensor(q).map_err(err)?.into()),
                }
            }
            _ => match quant(&t)? {
                Some(l) => Ok(l),
                None => Ok(QMatMul::from_qtensor(t).map_err(err)?.into()),
            },
        }
    }

    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let err = |e: candle_core::Error| format_err(self.path, format!("tensor {name}: {e}"));
        self.qtensor(name, shape)?
            .dequantize(&Device::Cpu)
            .map_err(err)?
            .reshape(shape)
            .map_err(err)
    }
}

fn read_gguf(
    path: &Path,
    meta: &GgufMetadata,
    file: &mut std::fs::File,
    c: &LlamaConfig,
    mode: WeightMode,
) -> Result<Weights> {
    let content = meta.content();
    let mut r = GgufReader {
        path,
        content,
        file,
        mode,
    };
    let (h, kv, ff) = (
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        ffn_size(content, path)?,
    );
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let t = |n: &str| format!("blk.{i}.{n}.weight");
        layers.push(Layer {
            attn_norm: r.dense(&t("attn_norm"), &[c.hidden])?,
            wq: r.matrix(&t("attn_q"), h, c.hidden)?,
            wk: r.matrix(&t("attn_k"), kv, c.hidden)?,
            wv: r.matrix(&t("attn_v"), kv, c.hidden)?,
            wo: r.matrix(&t("attn_output"), c.hidden, h)?,
            ffn_norm: r.dense(&t("ffn_norm"), &[c.hidden])?,
            gate: r.matrix(&t("ffn_gate"), ff, c.hidden)?,
            up: r.matrix(&t("ffn_up"), ff, c.hidden)?,
            down: r.matrix(&t("ffn_down"), c.hidden, ff)?,
        });
    }
    // The embedding stays in the file's blocks where moac's kernels read them (a
    // lookup dequantizes its rows), else f32; a tied LM head shares the blocks.
    let embed = match mode {
        WeightMode::F32 => None,
        _ => match r.matrix("token_embd.weight", c.vocab_size, c.hidden)? {
            Linear::Quant(q) => Some(Linear::Quant(q)),
            Linear::Candle(_) => None,
        },
    };
    let embed = match embed {
        Some(e) => e,
        None => QMatMul::Tensor(r.dense("token_embd.weight", &[c.vocab_size, c.hidden])?).into(),
    };
    let norm = r.dense("output_norm.weight", &[c.hidden])?;
    let lm_head = if content.tensor_infos.contains_key("output.weight") {
        r.matrix("output.weight", c.vocab_size, c.hidden)?
    } else if matches!(embed, Linear::Quant(_)) || mode == WeightMode::F32 {
        embed.clone()
    } else {
        r.matrix("token_embd.weight", c.vocab_size, c.hidden)?
    };
    let lm_head = match lm_head {
        Linear::Quant(q) => Linear::Quant(q.with_wide_inputs()),
        other => other,
    };
    Ok(Weights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

/// The MLP width of a GGUF llama (`feed_forward_length`, or the first gate's shape).
fn ffn_size(content: &candle_core::quantized::gguf_file::Content, path: &Path) -> Result<usize> {
    if let Some(v) = content.metadata.get("llama.feed_forward_length") {
        return match v.to_u64() {
            Ok(n) if n > 0 && n <= MAX_HIDDEN as u64 * 64 => Ok(n as usize),
            _ => Err(Error::Metadata {
                path: path.to_path_buf(),
                key: "llama.feed_forward_length".into(),
                message: format!("expected a positive integer, found {v:?}"),
            }),
        };
    }
    let info = content
        .tensor_infos
        .get("blk.0.ffn_gate.weight")
        .ok_or_else(|| format_err(path, "tensor blk.0.ffn_gate.weight is missing"))?;
    // [ffn, hidden], outermost first.
    info.shape
        .dims()
        .first()
        .copied()
        .ok_or_else(|| format_err(path, "tensor blk.0.ffn_gate.weight is not a matrix"))
}

fn read_hf(
    path: &Path,
    config: &serde_json::Value,
    tensors: &mut HashMap<String, Tensor>,
    c: &LlamaConfig,
) -> Result<Weights> {
    let ff = config
        .get("intermediate_size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Metadata {
            path: path.join("config.json"),
            key: "intermediate_size".into(),
            message: "missing or not an integer".into(),
        })? as usize;
    let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| format_err(path, format!("tensor {name} is missing")))?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor {name} has dtype {other:?} (moac reads f32, f16, bf16)"
                    ),
                })
            }
        }
        if t.dims() != shape {
            return Err(format_err(
                path,
                format!(
                    "tensor {name} has shape {:?}, the config asks for {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let (h, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let mut layers = Vec::with_capacity(c.num_layers);
    for i in 0..c.num_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}.weight");
        let mut m =
            |n: &str, r, k| -> Result<Linear> { Ok(QMatMul::Tensor(take(&p(n), &[r, k])?).into()) };
        layers.push(Layer {
            wq: m("self_attn.q_proj", h, c.hidden)?,
            wk: m("self_attn.k_proj", kv, c.hidden)?,
            wv: m("self_attn.v_proj", kv, c.hidden)?,
            wo: m("self_attn.o_proj", c.hidden, h)?,
            gate: m("mlp.gate_proj", ff, c.hidden)?,
            up: m("mlp.up_proj", ff, c.hidden)?,
            down: m("mlp.down_proj", c.hidden, ff)?,
            attn_norm: take(&p("input_layernorm"), &[c.hidden])?,
            ffn_norm: take(&p("post_attention_layernorm"), &[c.hidden])?,
        });
    }
    let embed = take("model.embed_tokens.weight", &[c.vocab_size, c.hidden])?;
    let norm = take("model.norm.weight", &[c.hidden])?;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let lm_head = match take("lm_head.weight", &[c.vocab_size, c.hidden]) {
        Ok(t) => QMatMul::Tensor(t).into(),
        Err(_) if tied => QMatMul::Tensor(embed.clone()).into(),
        Err(e) => return Err(e),
    };
    Ok(Weights {
        embed: QMatMul::Tensor(embed).into(),
        layers,
        norm,
        lm_head,
    })
}
