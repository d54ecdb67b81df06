//! The compiler's integration tests (one test binary; each file a module).
//!
//! One binary links once and runs its tests in parallel; `cargo test -p <crate> <module>::`
//! runs one file's tests.

mod abi_doc;
mod architecture_doc;
mod golden;
mod plan_fuzz;
