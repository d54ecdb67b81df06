//! A GGUF writer for tests: a tiny llama (a few small f32 tensors, a byte-level BPE
//! tokenizer of a handful of tokens) built in memory, with every part open to change
//! so tests can break exactly one thing.
#![allow(dead_code, clippy::unwrap_used)]

/// A metadata value as GGUF stores it.
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// One tensor: its name, dimensions outermost first, GGML type id and raw data.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
    /// The offset written for it; `None`: where the writer puts its data.
    pub offset: Option<u64>,
}

/// A GGUF file to be written.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, Meta)>,
    pub tensors: Vec<TensorSpec>,
}

/// The tiny model's figures.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub ff: usize,
    pub context: u32,
}

impl Default for TinyShape {
    fn default() -> Self {
        TinyShape {
            hidden: 8,
            heads: 2,
            kv_heads: 1,
            layers: 1,
            ff: 16,
            context: 64,
        }
    }
}

/// The tiny tokenizer: single letters, one merge, BOS and EOS as control tokens.
pub const TOKENS: [&str; 6] = ["a", "b", "c", "ab", "<s>", "</s>"];

fn f32_data(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32;
            (x - 0.5).to_le_bytes()
        })
        .collect()
}

impl Gguf {
    /// A valid tiny llama of `shape`.
    pub fn tiny(shape: TinyShape) -> Gguf {
        let s = shape;
        let hd = s.hidden / s.heads;
        let vocab = TOKENS.len();
        let metadata = vec![
            ("general.architecture".into(), Meta::Str("llama".into())),
            ("general.name".into(), Meta::Str("tiny".into())),
            ("llama.block_count".into(), Meta::U32(s.layers as u32)),
            ("llama.context_length".into(), Meta::U32(s.context)),
            ("llama.embedding_length".into(), Meta::U32(s.hidden as u32)),
            ("llama.feed_forward_length".into(), Meta::U32(s.ff as u32)),
            (
                "llama.attention.head_count".into(),
                Meta::U32(s.heads as u32),
            ),
            (
                "llama.attention.head_count_kv".into(),
                Meta::U32(s.kv_heads as u32),
            ),
            ("llama.rope.freq_base".into(), Meta::F32(10000.0)),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Meta::F32(1e-5),
            ),
            ("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Meta::Str("gpt2".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Meta::Strs(TOKENS.iter().map(|t| t.to_string()).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Meta::I32s(vec![1, 1, 1, 1, 3, 3]),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Meta::Strs(vec!["a b".into()]),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Meta::U32(4)),
            ("tokenizer.ggml.eos_token_id".into(), Meta::U32(5)),
            ("tokenizer.ggml.add_bos_token".into(), Meta::Bool(true)),
        ];
        let mut tensors = Vec::new();
        let mut add = |name: String, dims: Vec<usize>| {
            let n: usize = dims.iter().product();
            let seed = tensors.len() as u32;
            tensors.push(TensorSpec {
                name,
                dims: dims.iter().map(|&d| d as u64).collect(),
                type_id: 0,
                data: f32_data(n, seed),
                offset: None,
            });
        };
        add("token_embd.weight".into(), vec![vocab, s.hidden]);
        add("output_norm.weight".into(), vec![s.hidden]);
        for l in 0..s.layers {
            let t = |n: &str| format!("blk.{l}.{n}.weight");
            add(t("attn_norm"), vec![s.hidden]);
            add(t("attn_q"), vec![s.heads * hd, s.hidden]);
            add(t("attn_k"), vec![s.kv_heads * hd, s.hidden]);
            add(t("attn_v"), vec![s.kv_heads * hd, s.hidden]);
            add(t("attn_output"), vec![s.hidden, s.heads * hd]);
            add(t("ffn_norm"), vec![s.hidden]);
            add(t("ffn_gate"), vec![s.ff, s.hidden]);
            add(t("ffn_up"), vec![s.ff, s.hidden]);
            add(t("ffn_down"), vec![s.hidden, s.ff]);
        }
        Gguf {
            version: 3,
            metadata,
            tensors,
        }
    }

    /// Replaces (or adds) a metadata value.
    pub fn set(&mut self, key: &str, value: Meta) -> &mut Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = value,
            None => self.metadata.push((key.into(), value)),
        }
        self
    }

    pub fn tensor(&mut self, name: &str) -> &mut TensorSpec {
        self.tensors
            .iter_mut()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
    }

    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let str_ = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        };
        out.extend(b"GGUF");
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            str_(&mut out, key);
            let (t, body): (u32, Vec<u8>) = match value {
                Meta::U32(v) => (4, v.to_le_bytes().to_vec()),
                Meta::I32(v) => (5, v.to_le_bytes().to_vec()),
                Meta::U64(v) => (10, v.to_le_bytes().to_vec()),
                Meta::F32(v) => (6, v.to_le_bytes().to_vec()),
                Meta::Bool(v) => (7, vec![*v as u8]),
                Meta::Str(s) => {
                    let mut b = Vec::new();
                    str_(&mut b, s);
                    (8, b)
                }
                Meta::Strs(list) => {
                    let mut b = Vec::new();
                    b.extend(8u32.to_le_bytes());
                    b.extend((list.len() as u64).to_le_bytes());
                    for s in list {
                        str_(&mut b, s);
                    }
                    (9, b)
                }
                Meta::I32s(list) => {
                    let mut b = Vec::new();
                    b.extend(5u32.to_le_bytes());
                    b.extend((list.len() as u64).to_le_bytes());
                    for v in list {
                        b.extend(v.to_le_bytes());
                    }
                    (9, b)
                }
            };
            out.extend(t.to_le_bytes());
            out.extend(body);
        }
        let align = |n: usize| n.div_ceil(32) * 32;
        let mut next = 0usize;
        let mut placed = Vec::new();
        for t in &self.tensors {
            str_(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset.unwrap_or(next as u64).to_le_bytes());
            placed.push(next);
            next = align(next + t.data.len());
        }
        out.resize(align(out.len()), 0);
        let base = out.len();
        for (t, at) in self.tensors.iter().zip(placed) {
            out.resize(base + at, 0);
            out.extend(&t.data);
        }
        out
    }

    /// Writes the file into `dir` as `name`, returning its path.
    pub fn write(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        path
    }
}
