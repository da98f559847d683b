//! vmwatch-common: what both daemons share.
//!
//! - [`protocol`]: wire protocol v1 — payload types, the four-frame HMAC envelope, encoding and
//!   authentication (pure functions, no sockets).
//! - [`keys`]: derivation of node secrets and CURVE keys from the master secret.
//! - [`config`]: the strict `KEY=VALUE` configuration parser.
//! - [`logging`]: a log file that is reopened on SIGHUP.
//! - [`daemon`]: the skeleton both binaries run: CLI → config (exit 78) → log → run, one
//!   shutdown token, the signal and watchdog threads, bounded drains.
//! - [`time`]: the one place that reads the wall clock as unix milliseconds.
#![forbid(unsafe_code)]

pub mod config;
pub mod daemon;
pub mod keys;
pub mod logging;
pub mod protocol;

/// Wall-clock helpers. Decision code takes `now` as an argument; only shells call these.
pub mod time {
    /// Unix time in milliseconds.
    pub fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The version both binaries report (`--version`, heartbeats).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
