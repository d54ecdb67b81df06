//! The artifact: what `moac compile` writes and `moac-runtime` loads. [`manifest`] is
//! the contract (versioned, the only code that knows its JSON), [`write`] builds an
//! artifact folder atomically, [`bindings`] generates its Rust bindings (cargo feature
//! `bindings`, on by default).

#[cfg(feature = "bindings")]
pub mod bindings;
pub mod manifest;
pub mod write;

pub use manifest::Manifest;
pub use write::{check_archs, write, CompileOptions, CompileReport, EmitKind, TuningChoice};
