//! MoA's plan pipeline on moac's models: calibration samples ([`calib`]), attention
//! influence ([`influence`]) summed into a profile ([`profile`]), and validation of
//! candidate plans ([`validate`]). The solver that turns a profile into plans is model-free
//! (`moac::plan::optimize`).

pub mod calib;
pub mod heads;
pub mod influence;
pub mod optimize;
pub mod profile;
pub mod tasks;
pub mod validate;
