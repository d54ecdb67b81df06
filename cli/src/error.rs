//! The error of every `moac` command: the compiler's, the runtime's, a bad argument or
//! input, or a check that failed.

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Compiler(#[from] moac::Error),
    #[error(transparent)]
    Runtime(#[from] moac_runtime::Error),
    #[error(transparent)]
    Model(#[from] moac_model::Error),
    /// A bad argument or input file (named in the message).
    #[error("{0}")]
    Usage(String),
    /// A check ran and found wrong results.
    #[error("{0}")]
    Failed(String),
}

impl From<candle_core::Error> for CliError {
    fn from(e: candle_core::Error) -> Self {
        CliError::Runtime(moac_runtime::Error::Tensor(e))
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;
