//! vmwatch-master: the daemon skeleton (CLI → config, exit 78 → log → run → drain) around
//! [`vmwatch_master::run::run`], plus the one-shot `--node-secret N`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context as _;
use vmwatch_common::config::{Cli, EX_CONFIG};
use vmwatch_common::daemon::{Daemon, EX_USAGE};
use vmwatch_master::config::{self, MasterConfig};

fn main() -> ExitCode {
    Daemon {
        name: "vmwatch-master",
        default_config: config::DEFAULT_PATH,
        default_log: "/var/log/vmwatch-master.log",
        load: MasterConfig::load,
        describe: MasterConfig::describe,
        log: |c| (c.log_file.clone(), c.log_level.clone()),
        command: node_secret,
    }
    .main(|config, ctx| {
        vmwatch_master::run::run(config, ctx).context("the master stopped on an error")
    })
}

/// `--node-secret N`: prints the key lines for node N's configuration.
fn node_secret(cli: &Cli, config: &MasterConfig) -> Option<ExitCode> {
    let node = cli.node_secret.as_ref()?;
    let node = match vmwatch_common::protocol::NodeId::parse(node) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("vmwatch-master: --node-secret: {e}");
            return Some(ExitCode::from(EX_USAGE));
        }
    };
    Some(match config.node_config_lines(&node) {
        Some(lines) => {
            print!("{lines}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("vmwatch-master: --node-secret needs `secret` in the configuration");
            ExitCode::from(EX_CONFIG as u8)
        }
    })
}
