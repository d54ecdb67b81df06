//! A model ready to run: the weights ([`Llama`]), the tokenizer and the chat template,
//! from a GGUF file or a Hugging Face folder.

use crate::chat::{ChatTemplate, Message, CHATML};
use crate::gguf::GgufMetadata;
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightMode;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A loaded model with its tokenizer and chat template.
pub struct Model {
    pub path: PathBuf,
    pub llama: Llama,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
}

impl Model {
    /// Loads a GGUF file or a Hugging Face folder (`config.json`, `*.safetensors`,
    /// `tokenizer.json`). `mode`: see [`Llama::load`].
    pub fn load(path: &Path, mode: WeightMode) -> Result<Model> {
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            });
        }
        let llama = Llama::load(path, mode)?;
        let (tokenizer, template) = if path.is_dir() {
            (Tokenizer::from_hf_dir(path)?, hf_template(path)?)
        } else {
            let meta = GgufMetadata::read(path)?;
            let t = match meta.get("tokenizer.chat_template") {
                None => None,
                Some(_) => Some((
                    meta.string("tokenizer.chat_template")?.to_string(),
                    format!("{} metadata tokenizer.chat_template", path.display()),
                )),
            };
            (Tokenizer::from_gguf(&meta)?, t)
        };
        let name = |id: Option<u32>| id.and_then(|i| tokenizer.token(i)).unwrap_or_default();
        let bos = name(tokenizer.bos);
        let eos = name(tokenizer.stop.first().copied());
        let chat = match template {
            Some((source, origin)) => ChatTemplate::new(source, origin, bos, eos),
            None => ChatTemplate::new(CHATML.into(), "ChatML fallback", bos, eos),
        };
        if tokenizer.vocab_size() > llama.config.vocab_size {
            return Err(Error::Format {
                path: path.to_path_buf(),
                message: format!(
                    "the tokenizer has {} ids, the model's embedding only {}",
                    tokenizer.vocab_size(),
                    llama.config.vocab_size
                ),
            });
        }
        Ok(Model {
            path: path.to_path_buf(),
            llama,
            tokenizer,
            chat,
        })
    }

    /// The ids of a plain prompt (control-token strings matched as control tokens; a BOS
    /// where the model expects one).
    pub fn prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode_prompt(text)
    }

    /// The ids of `user` as one user turn in the model's chat template, with the
    /// generation prompt, then `answer_prefix` (the start of the assistant's answer).
    pub fn chat_prompt(&self, user: &str, answer_prefix: &str) -> Result<Vec<u32>> {
        let mut text = self.chat.render(&[Message::user(user)], true)?;
        text.push_str(answer_prefix);
        self.tokenizer.encode_prompt(&text)
    }
}

/// A Hugging Face folder's chat template: `chat_template.jinja`, or
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of
/// which "default" is taken).
fn hf_template(dir: &Path) -> Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let json = crate::weights::read_json(&cfg)?;
    let origin = format!("{} chat_template", cfg.display());
    Ok(match json.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some((s.clone(), origin)),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template").and_then(|s| s.as_str()))
            .map(|s| (s.to_string(), origin)),
        _ => None,
    })
}
