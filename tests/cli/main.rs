//! The CLI's integration tests: the `moac` binary run on real inputs (one test binary; each file a module).
//!
//! One binary links once and runs its tests in parallel; `cargo test -p <crate> <module>::`
//! runs one file's tests.

mod bad_model;
mod compile;
mod engine;
mod inspect;
mod model;
mod pipeline;
mod plan_errors;
mod run;
mod shapes;
mod tune;
mod verify;
