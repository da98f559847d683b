//! vmwatch-master as a library: authenticates node messages, keeps the inventory and journal,
//! serves the API. `main.rs` is only the daemon skeleton around [`run::run`].
//!
//! Decisions are plain functions with time as an argument ([`rules`], [`idle`], [`duplicate`],
//! [`retention`]); [`core`], [`store`], [`ingest`], [`webhook`], [`bus`], [`serve`] and [`api`] are the
//! shells around them, and [`run`] wires them together.
// `deny`, not `forbid`: `raw` (two FFI calls the zmq and libc crates lack) is the one module
// allowed `unsafe`.
#![deny(unsafe_code)]

pub mod activity;
mod api;
mod blocking;
mod bus;
/// Journal entries the event bus publishes before waiting for their confirms (for the benchmark
/// reference).
pub const BUS_WINDOW: u32 = bus::WINDOW;
pub mod config;
mod containment;
pub mod core;
mod duplicate;
pub mod enroll;
#[cfg(test)]
mod fuzz;
pub mod ha;
mod idle;
mod ingest;
mod metrics;
mod raw;
pub mod registry;
pub mod retention;
pub mod rows;
pub mod rules;
pub mod run;
mod serve;
pub mod store;
mod webhook;
