//! vmwatch-node as a library: watches libvirtd on a hypervisor and pushes signed facts to the
//! master. `main.rs` is only the daemon skeleton around [`agent::run`].
//!
//! - [`core`]: every decision of the agent, with no I/O and time as an argument.
//! - [`builder`] and [`facts`]: facts → signed messages (pure).
//! - [`libvirt`]: the libvirt adapter, allowed `unsafe`, as is [`allocator`] (one glibc call).
//! - [`socket`]: the ZeroMQ PUSH socket (CURVE client).
//! - [`agent`]: the shell that drives the core with libvirt, the socket and systemd.
//! - [`config`]: `NodeConfig`, validated completely before anything starts.
#![deny(unsafe_code)]

pub mod agent;
pub mod allocator;
pub mod builder;
pub mod config;
pub mod core;
pub mod facts;
pub mod libvirt;
pub mod socket;
