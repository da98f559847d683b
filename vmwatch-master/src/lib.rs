//! vmwatch-master as a library: authenticates node messages, keeps the inventory and journal,
//! serves the API. `main.rs` is only the daemon skeleton around [`run::run`].
//!
//! Decisions are plain functions with time as an argument ([`rules`], [`idle`], [`duplicate`],
//! [`retention`]); [`core`], [`store`], [`ingest`], [`webhook`], [`serve`] and [`api`] are the
//! shells around them, and [`run`] wires them together.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod core;
pub mod duplicate;
#[cfg(test)]
mod fuzz;
pub mod idle;
pub mod ingest;
pub mod metrics;
pub mod retention;
pub mod rules;
pub mod run;
pub mod serve;
pub mod store;
pub mod webhook;
