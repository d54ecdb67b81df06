//! moac-model: Llama-family models for moac. This first part reads a GGUF file's
//! metadata ([`gguf`]) and builds the model's tokenizer from it ([`tokenizer`]): GPT-2
//! byte-level BPE with the pre-tokenizer the file names (`smollm`, `llama-bpe`, ...),
//! control tokens matched as whole strings. The forward pass and the commands that run
//! models through `moac-runtime` build on it.

pub mod gguf;
pub mod llama;
pub mod tokenizer;

use std::path::PathBuf;

/// An error of the model code: the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a GGUF file candle can read.
    #[error("{path}: not a readable GGUF file: {message}")]
    Format { path: PathBuf, message: String },
    /// A metadata key is missing or has the wrong type.
    #[error("{path}: metadata {key}: {message}")]
    Metadata {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// Something the file asks for that moac does not support (named).
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Runtime(#[from] moac_runtime::Error),
    #[error(transparent)]
    Plan(#[from] moac::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
