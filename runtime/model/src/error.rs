//! The model crate's error type: the file and what is wrong with it (a GGUF or
//! Hugging Face file, a plan made for another shape, a sequence too long), or the
//! runtime's and the compiler's errors passed through.

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
    /// The file (a GGUF file, a safetensors file, a JSON file of a model folder) is
    /// malformed, or lacks what the model needs; the message says what.
    #[error("{path}: {message}")]
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
    #[error("{0}")]
    Template(String),
    /// A plan made for another model shape.
    #[error("{plan}: {message}")]
    PlanMismatch { plan: PathBuf, message: String },
    /// A sequence longer than the model (or the cache) takes.
    #[error("{what}: {len} tokens, more than the {max} the model takes")]
    TooLong {
        what: String,
        len: usize,
        max: usize,
    },
    /// A call that cannot be carried out as asked.
    #[error("{0}")]
    Usage(String),
    /// An invariant moac keeps itself broke (a bug in moac, not the caller's doing).
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Runtime(#[from] moac_runtime::Error),
    #[error(transparent)]
    Plan(#[from] moac::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
