//! vmwatch-node: the daemon skeleton (CLI → config, exit 78 → log → run → drain) around
//! [`vmwatch_node::agent::run`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context as _;
use vmwatch_common::daemon::Daemon;
use vmwatch_node::{agent, config};

fn main() -> ExitCode {
    Daemon {
        name: "vmwatch-node",
        default_config: config::DEFAULT_PATH,
        default_log: "/var/log/vmwatch-node.log",
        load: config::NodeConfig::load,
        describe: config::NodeConfig::describe,
        log: |c| (c.log_file.clone(), c.log_level.clone()),
        command: |cli, _| {
            // The CLI is shared; this option belongs to the master.
            if cli.node_secret.is_some() || !cli.command.is_empty() {
                eprintln!(
                    "vmwatch-node: --node-secret, enroll and revoke are vmwatch-master commands"
                );
                return Some(ExitCode::from(vmwatch_common::daemon::EX_USAGE));
            }
            None
        },
    }
    .main(|config, ctx| agent::run(config, ctx).context("the node stopped on an error"))
}
