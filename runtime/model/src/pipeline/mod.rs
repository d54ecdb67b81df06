//! MoA's plan pipeline on moac's models: calibration samples ([`calib`]), attention
//! influence ([`influence`]) summed into a profile ([`profile`]), the solver's problem
//! ([`objective`]), and validation of candidate plans ([`validate`]). The stages as calls
//! with their files are [`stages`]; [`make`] runs them all, with a work folder that a
//! later call resumes from (`moac plan make`). The solver that turns a profile into
//! plans is model-free (`moac::plan::optimize`).

pub mod calib;
mod causal;
pub mod heads;
pub mod influence;
pub mod make;
pub mod objective;
pub mod profile;
pub mod stages;
pub mod tasks;
pub mod validate;

pub use make::{make, Made, MakeOptions};
pub use stages::Progress;
