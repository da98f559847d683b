//! vmwatch-node: watches libvirtd on a hypervisor and pushes signed facts to the master.
//!
//! config → run → drain: the configuration is validated completely before libvirt or the
//! network is touched; a bad one exits with status 78.

mod agent;
mod builder;
mod config;
mod facts;
mod libvirt;
mod sender;

use std::process::ExitCode;

use vmwatch_common::config::{is_world_readable, Cli, EX_CONFIG};
use vmwatch_common::logging::{self, LogFile};

const DEFAULT_LOG: &str = "/var/log/vmwatch-node.log";

fn main() -> ExitCode {
    let cli = match Cli::parse(std::env::args().skip(1), config::DEFAULT_PATH) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmwatch-node: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.help {
        print!("{}", Cli::usage("vmwatch-node", config::DEFAULT_PATH));
        return ExitCode::SUCCESS;
    }
    if cli.version {
        println!("vmwatch-node {}", vmwatch_common::VERSION);
        return ExitCode::SUCCESS;
    }
    let config = match config::NodeConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmwatch-node: bad configuration: {e}");
            logging::append_line(
                std::path::Path::new(DEFAULT_LOG),
                &format!("ERROR bad configuration: {e}"),
            );
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    if cli.check_config {
        print!("{}", config.describe());
        return ExitCode::SUCCESS;
    }
    let log = match LogFile::open(&config.log_file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "vmwatch-node: cannot open log file {}: {e}; logging to stderr",
                config.log_file.display()
            );
            LogFile::stderr()
        }
    };
    if let Err(e) = logging::init(log.clone(), &config.log_level) {
        eprintln!("vmwatch-node: {e}");
        return ExitCode::from(EX_CONFIG as u8);
    }
    if is_world_readable(&cli.config) {
        tracing::warn!(path = %cli.config.display(), "configuration file holding the secret is world-readable; chmod 0640 it");
    }

    let flags = agent::Flags::default();
    for (sig, flag) in [
        (signal_hook::consts::SIGTERM, &flags.terminate),
        (signal_hook::consts::SIGINT, &flags.terminate),
        (signal_hook::consts::SIGHUP, &flags.reopen_log),
    ] {
        if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
            tracing::error!(error = %e, signal = sig, "cannot install signal handler");
            return ExitCode::FAILURE;
        }
    }
    // The default event implementation must exist before the first connection is opened.
    if let Err(e) = libvirt::start_event_loop() {
        tracing::error!(error = %e, "cannot start the libvirt event loop");
        return ExitCode::FAILURE;
    }
    let sender = match sender::Sender::start(&config.connect, config.send_queue, &config.curve) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the sender");
            return ExitCode::FAILURE;
        }
    };
    let reopen = log.clone();
    let agent = agent::Agent::new(
        config,
        sender,
        Box::new(move || {
            if let Err(e) = reopen.reopen() {
                tracing::error!(error = %e, "cannot reopen the log file; still writing to the old one");
            }
        }),
    );
    agent.run(&flags);
    ExitCode::SUCCESS
}
