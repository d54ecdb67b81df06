//! The one error type of the moac compiler. Every variant carries the context a user
//! needs to find the problem: the file, the JSON line and column, the layer and head.

use std::fmt;
use std::path::PathBuf;

/// Where in a plan something is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// The plan as a whole.
    Plan,
    /// One layer (0-based).
    Layer(usize),
    /// One query head of one layer (both 0-based).
    Head { layer: usize, head: usize },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Plan => Ok(()),
            Location::Layer(l) => write!(f, "layer {l}: "),
            Location::Head { layer, head } => write!(f, "layer {layer}, head {head}: "),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {location}{message}")]
    Plan {
        path: PathBuf,
        location: Location,
        message: String,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// An artifact folder that is not what `moac compile` writes (another format or
    /// version, a missing file, edited contents).
    #[error("{path}: {message}")]
    Artifact { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    #[error("{0}")]
    NvrtcMissing(String),
    /// A toolchain (NVRTC, ptxas through NVRTC, g++ for emu) refused a unit: the log
    /// is the tool's own, whole.
    #[error("{tool} failed to compile {unit} for {arch} (options: {options}):\n{log}")]
    Toolchain {
        tool: &'static str,
        unit: String,
        arch: String,
        options: String,
        log: String,
    },
    /// A launch's arguments do not match the kernel ABI (`abi::params`).
    #[error("{kernel}: {message}")]
    Abi { kernel: String, message: String },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, err: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C" to its messages; the location is
        // already in the prefix, so drop the repetition.
        let full = err.to_string();
        let message = match full.rfind(" at line ") {
            Some(i) => full[..i].to_string(),
            None => full,
        };
        Error::Json {
            path: path.into(),
            line: err.line(),
            column: err.column(),
            message,
        }
    }

    pub(crate) fn plan(
        path: impl Into<PathBuf>,
        location: Location,
        message: impl Into<String>,
    ) -> Self {
        Error::Plan {
            path: path.into(),
            location,
            message: message.into(),
        }
    }
}
