//! The `moac` command as a library: one module per subcommand under [`commands`]
//! (its arguments and what it does; `main.rs` only dispatches), and the tools behind
//! them under [`tools`] (verification against the reference, autotuning, running one
//! layer over safetensors), which the tests and `moac-gpu-bench` use too.

pub mod commands;
pub mod error;
pub mod tools;

pub use error::{CliError, Result};
