//! The model crate's integration tests (one test binary; each file a module).
//!
//! One binary links once and runs its tests in parallel; `cargo test -p <crate> <module>::`
//! runs one file's tests.

mod bad_input;
mod calib_mix;
mod engine;
mod gguf_fuzz;
mod hf;
mod influence;
mod llama;
mod pipeline;
mod quant;
/// The tiny GGUF writer `bad_input` and `gguf_fuzz` share.
mod tiny_gguf;
mod tokenizer;
