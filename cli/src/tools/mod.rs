//! The tools behind `moac verify`, `moac tune` and `moac run` (the retrieval plot is
//! `moac_model::svg`).

pub mod run;
pub mod sweep;
pub mod verify;
