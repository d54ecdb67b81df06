//! The tools behind `moac verify`, `moac tune` and `moac run`.

pub mod run;
pub mod tune;
pub mod verify;
