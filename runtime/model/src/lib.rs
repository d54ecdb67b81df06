//! moac-model: Llama-family models run through moac. A model comes from a GGUF file or a
//! Hugging Face folder ([`weights`], [`gguf`]), with its tokenizer ([`tokenizer`]) and
//! chat template ([`chat`]) ([`model::Model`] bundles them); [`llama`] is the forward
//! pass, whose attention goes through [`attention::Attention`]: moac's compacted cache
//! on any backend, or the plain dense reference. [`generate`] samples text, [`eval`]
//! measures perplexity and [`retrieval`] makes MoA's retrieval tasks ([`svg`] draws
//! charts). [`pipeline`] makes MoA plans for a model ([`pipeline::make`] in one call).

pub mod attention;
pub mod chat;
pub mod engine;
mod error;
pub mod eval;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod model;
pub mod pipeline;
pub mod quant;
pub mod retrieval;
pub mod svg;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use model::Model;
