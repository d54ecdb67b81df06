//! The tokenizer of a GGUF model, from its metadata: GPT-2 byte-level BPE
//! (`tokenizer.ggml.model = gpt2`) with the vocabulary, merges and token types the file
//! carries, and the pre-tokenizer its `tokenizer.ggml.pre` names. Control tokens
//! (`<|im_start|>`, ...) are matched as whole strings before anything else, so a prompt
//! may contain them.

use crate::gguf::GgufMetadata;
use crate::{Error, Result};
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Llama-3's pre-tokenizer regex (`llama-bpe`): three-digit number groups, letters with
/// an optional leading non-letter, punctuation runs, newlines.
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer a GGUF file names, built from the pieces `tokenizers` has.
fn pre_tokenizer(name: &str) -> Option<PreTokenizerWrapper> {
    let gpt2 = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    Some(match name {
        // GPT-2's regex over bytes, no prefix space.
        "gpt2" | "default" => gpt2(),
        // SmolLM: every digit on its own, then GPT-2's regex.
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            gpt2(),
        ])),
        "llama-bpe" | "llama3" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(LLAMA3_REGEX.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .ok()?,
            ),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])),
        _ => return None,
    })
}

/// A model's tokenizer and its special ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The beginning-of-sequence id, if the file names one.
    pub bos: Option<u32>,
    /// The ids that end generation (end-of-sequence and end-of-text).
    pub stop: Vec<u32>,
    /// Whether the model expects a BOS id before every prompt.
    pub add_bos: bool,
}

impl Tokenizer {
    /// The tokenizer described by a GGUF file's metadata.
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Tokenizer> {
        let unsupported = |message: String| Error::Unsupported {
            path: meta.path().to_path_buf(),
            message,
        };
        let model = meta.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(unsupported(format!(
                "tokenizer model {model:?} (moac reads GPT-2 byte-level BPE, \"gpt2\")"
            )));
        }
        let pre_name = meta.string("tokenizer.ggml.pre").unwrap_or("default");
        let pre = pre_tokenizer(pre_name).ok_or_else(|| {
            unsupported(format!(
                "pre-tokenizer {pre_name:?} (moac knows gpt2, default, smollm, llama-bpe)"
            ))
        })?;
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let types = match meta.get("tokenizer.ggml.token_type") {
            Some(_) => meta.ints("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        let merges = meta
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| Error::Metadata {
                        path: meta.path().to_path_buf(),
                        key: "tokenizer.ggml.merges".into(),
                        message: format!("merge {m:?} is not two tokens"),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Format {
                path: meta.path().to_path_buf(),
                message: format!("the tokenizer in the metadata: {e}"),
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.to_string(), t == CONTROL))
            .collect();
        inner.add_special_tokens(&special);
        let mut stop = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(i) = meta.opt_u32(key)? {
                if !stop.contains(&i) {
                    stop.push(i);
                }
            }
        }
        let add_bos = matches!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(candle_core::quantized::gguf_file::Value::Bool(true))
        );
        Ok(Tokenizer {
            inner,
            bos: meta.opt_u32("tokenizer.ggml.bos_token_id")?,
            stop,
            add_bos,
        })
    }

    /// The tokenizer of a Hugging Face folder: `tokenizer.json`, with the special ids
    /// from `config.json` / `generation_config.json` (`bos_token_id`, `eos_token_id`:
    /// one id or a list) and whether a BOS is added from what the tokenizer's
    /// post-processor puts around an empty text.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::Io {
                path: file,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::Format {
            path: file.clone(),
            message: format!("not a readable tokenizer: {e}"),
        })?;
        let mut bos = None;
        let mut stop = Vec::new();
        for name in ["generation_config.json", "config.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = crate::weights::read_json(&path)?;
            if bos.is_none() {
                bos = json
                    .get("bos_token_id")
                    .and_then(|v| v.as_u64())
                    .map(|v| v as u32);
            }
            let ids: Vec<u32> = match json.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect(),
                Some(v) => v.as_u64().map(|v| v as u32).into_iter().collect(),
                None => Vec::new(),
            };
            for id in ids {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        let empty = inner
            .encode("", true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let add_bos = bos.is_some_and(|b| empty.get_ids().first() == Some(&b));
        Ok(Tokenizer {
            inner,
            bos,
            stop,
            add_bos,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The string of one token id (control tokens by their text), if the id exists.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The ids of `text` as a prompt: a BOS first where the model expects one (and the
    /// text does not start with it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let (true, Some(b)) = (self.add_bos, self.bos) {
            if ids.first() != Some(&b) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// The ids of `text`; control-token strings in it become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (control tokens included when `keep_special`).
    pub fn decode(&self, ids: &[u32], keep_special: bool) -> Result<String> {
        self.inner
            .decode(ids, !keep_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The vocabulary size (with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
