//! The runtime's one error type: every variant carries what a caller needs to act on it
//! (the buffer and the sizes, the layer and the row, the driver's own error), in the
//! manner of candle-core's error enum.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The compiler refused the plan, an artifact's manifest, or a toolchain run (its
    /// variants name the file, layer and head, or the tool and its log).
    #[error(transparent)]
    Compiler(#[from] moac::Error),
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A tensor or buffer has the wrong shape or size.
    #[error("{name} must be {expected}, got {got}")]
    ShapeMismatch {
        name: String,
        expected: String,
        got: String,
    },
    /// A sequence would hold more tokens than the cache was built for.
    #[error("layer {layer}, row {row}: {tokens} tokens do not fit a cache built for N = {n}")]
    CapacityExceeded {
        layer: usize,
        row: usize,
        tokens: usize,
        n: usize,
    },
    /// A prompt longer than the cache was allocated for.
    #[error("a prompt of {len} tokens does not fit a cache allocated for prompts of {max}")]
    PromptTooLong { len: usize, max: usize },
    /// An allocation failed: device memory, or the host memory emu stands in with.
    /// `what` names the allocation, `bytes` what was asked for.
    #[error("out of memory allocating {bytes} bytes for {what}")]
    OutOfMemory { what: String, bytes: u64 },
    /// cuBLAS failed; `context` says what moac was doing, the status is cuBLAS's.
    #[error("cuBLAS: {context}: {:?}", .source.0)]
    Cublas {
        context: String,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// The CUDA driver failed; `context` says what moac was doing.
    #[error("cuda backend: {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A tool moac runs (the emu engine, the C++ compiler, the dynamic loader) failed;
    /// `log` is what it said.
    #[error("{tool}: {log}")]
    Toolchain { tool: String, log: String },
    /// The backend cannot run here (no GPU, no driver, no sanitizer runtime).
    #[error("{0}")]
    Unavailable(String),
    /// An artifact folder that does not hold what its manifest says.
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    /// A call the API does not allow (a layer the artifact lacks, a backend name).
    #[error("{0}")]
    Usage(String),
    /// An invariant moac keeps itself broke (a bug in moac, not the caller's doing): a
    /// lowered layer without one of its kernels, a kernel no source defines.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(
        name: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Error {
        Error::ShapeMismatch {
            name: name.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }

    /// A cuBLAS error with what moac was doing.
    pub fn cublas(
        context: impl std::fmt::Display,
    ) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
        move |source| Error::Cublas {
            context: context.to_string(),
            source,
        }
    }

    /// A driver error with what moac was doing.
    pub fn driver(
        context: impl std::fmt::Display,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Driver {
            context: context.to_string(),
            source,
        }
    }
}

/// `name` must hold exactly `want` elements.
pub(crate) fn expect_len(name: &str, what: &str, want: usize, got: usize) -> Result<()> {
    if want != got {
        return Err(Error::shape(
            name,
            format!("{want} elements ({what})"),
            format!("{got} elements"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_failures_say_what_happened() {
        let oom = Error::OutOfMemory {
            what: "a cuda device buffer".into(),
            bytes: 1 << 30,
        };
        assert_eq!(
            oom.to_string(),
            "out of memory allocating 1073741824 bytes for a cuda device buffer"
        );
        let status = cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
        let blas = Error::cublas("gemm 4x4x4")(cudarc::cublas::result::CublasError(status));
        assert_eq!(
            blas.to_string(),
            "cuBLAS: gemm 4x4x4: CUBLAS_STATUS_NOT_SUPPORTED"
        );
        assert_eq!(
            Error::Internal("no decode kernel bound".into()).to_string(),
            "internal error: no decode kernel bound"
        );
    }
}
