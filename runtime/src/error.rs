//! The runtime's error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Compiler(#[from] moac::Error),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Capacity(String),
    #[error("{0}")]
    Backend(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{path}: {message}")]
    Artifact {
        path: std::path::PathBuf,
        message: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape(msg.into()))
}
