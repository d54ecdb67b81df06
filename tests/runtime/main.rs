//! The runtime's integration tests (one test binary; each file a module).
//!
//! One binary links once and runs its tests in parallel; `cargo test -p <crate> <module>::`
//! runs one file's tests.

mod backends;
mod cpu_attention;
mod device_api;
mod emu_header;
mod geometry_device;
mod reference;
