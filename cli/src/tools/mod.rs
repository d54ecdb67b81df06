//! The tools behind `moac verify`, `moac tune` and `moac run`, and the retrieval plot.

pub mod run;
pub mod svg;
pub mod sweep;
pub mod verify;
