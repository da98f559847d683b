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
        command: |cli, config| {
            node_secret(cli, config)
                .or_else(|| migrate_command(cli, config))
                .or_else(|| registry_command(cli, config))
        },
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
            eprintln!("vmwatch-master: note: this does not enroll {node}; its key is refused until `vmwatch-master enroll {node}` (or the enrollment API) enrolls it");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("vmwatch-master: --node-secret needs `secret` in the configuration");
            ExitCode::from(EX_CONFIG as u8)
        }
    })
}

/// `enroll N` / `revoke N`: writes the registry of the configured database; a running master
/// sees it within a second. Run as root, it first becomes the database's owner, so the files
/// SQLite creates beside it (`-wal`, `-shm`) stay the master's.
fn registry_command(cli: &Cli, config: &MasterConfig) -> Option<ExitCode> {
    let (verb, node) = match cli.command.as_slice() {
        [] => return None,
        [verb, node] if verb == "enroll" || verb == "revoke" => (verb.as_str(), node),
        _ => {
            eprintln!(
                "vmwatch-master: unknown command `{}` (try: enroll NODE_ID, revoke NODE_ID, migrate --to URL)",
                cli.command.join(" ")
            );
            return Some(ExitCode::from(EX_USAGE));
        }
    };
    let node = match vmwatch_common::protocol::NodeId::parse(node) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("vmwatch-master: {verb}: {e}");
            return Some(ExitCode::from(EX_USAGE));
        }
    };
    if let Some(path) = config.database.sqlite_path() {
        if let Err(e) = become_owner_of(path) {
            eprintln!("vmwatch-master: {verb}: {e}");
            return Some(ExitCode::FAILURE);
        }
    }
    // The master creates and migrates the database; a first enrollment before it ever ran
    // does the same.
    if let Err(e) = vmwatch_master::store::Store::open(&config.database) {
        eprintln!("vmwatch-master: {verb}: {e}");
        return Some(ExitCode::FAILURE);
    }
    let mut db = match vmwatch_master::store::Registry::open(&config.database) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("vmwatch-master: {verb}: {e}");
            return Some(ExitCode::FAILURE);
        }
    };
    let now = vmwatch_common::time::now_ms();
    Some(if verb == "enroll" {
        match vmwatch_master::enroll::enroll(config, &mut db, &node, now) {
            Ok(e) => {
                print!("{}", e.config);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmwatch-master: enroll: {e}");
                ExitCode::FAILURE
            }
        }
    } else {
        match vmwatch_master::enroll::revoke(&mut db, &node, now) {
            Ok(vmwatch_master::store::Revoked::NotEnrolled) => {
                eprintln!("vmwatch-master: revoke: node `{node}` is not enrolled");
                ExitCode::FAILURE
            }
            Ok(r) => {
                let what = if r == vmwatch_master::store::Revoked::Now {
                    "revoked"
                } else {
                    "was already revoked"
                };
                println!("node {node} {what}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vmwatch-master: revoke: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `migrate --to URL [--password-file PATH]`: copies the configured SQLite database into an
/// empty PostgreSQL one and verifies every table's count. The master should be stopped.
fn migrate_command(cli: &Cli, config: &MasterConfig) -> Option<ExitCode> {
    let (to, password_file) = match cli.command.as_slice() {
        [] => return None,
        [verb, ..] if verb != "migrate" => return None,
        [_, flag, to] if flag == "--to" => (to, None),
        [_, flag, to, pflag, file] | [_, pflag, file, flag, to]
            if flag == "--to" && pflag == "--password-file" =>
        {
            (to, Some(std::path::Path::new(file.as_str())))
        }
        _ => {
            eprintln!("vmwatch-master: usage: migrate --to postgres://USER@HOST/DB [--password-file PATH]");
            return Some(ExitCode::from(EX_USAGE));
        }
    };
    let target = match vmwatch_master::store::Database::parse(to, password_file) {
        Ok(t @ vmwatch_master::store::Database::Postgres(_)) => t,
        Ok(_) => {
            eprintln!("vmwatch-master: migrate: --to takes a postgres:// URL");
            return Some(ExitCode::from(EX_USAGE));
        }
        Err(e) => {
            eprintln!("vmwatch-master: migrate: {e}");
            return Some(ExitCode::from(EX_USAGE));
        }
    };
    if config.database.sqlite_path().is_none() {
        eprintln!(
            "vmwatch-master: migrate: the configured database is already {}",
            config.database
        );
        return Some(ExitCode::from(EX_USAGE));
    }
    println!("copying {} to {target}", config.database);
    match vmwatch_master::store::migrate(&config.database, &target) {
        Ok(counts) => {
            for c in &counts {
                println!(
                    "{:<13} {:>10} rows copied, {:>10} in the target",
                    c.table, c.source, c.target
                );
            }
            println!("verified: every table holds as many rows in {target}");
            println!("next: set database={target} in the configuration and start the master");
            Some(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("vmwatch-master: migrate: {e} (the target was left as it was)");
            Some(ExitCode::FAILURE)
        }
    }
}

/// As root, takes the uid and gid of the database's directory owner (the `vmwatch` user).
fn become_owner_of(db: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let dir = db
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if meta.uid() == 0 {
        return Ok(());
    }
    nix::unistd::setgid(nix::unistd::Gid::from_raw(meta.gid()))
        .and_then(|()| nix::unistd::setuid(nix::unistd::Uid::from_raw(meta.uid())))
        .map_err(|e| {
            format!(
                "cannot become the owner of {} (uid {}): {e}",
                dir.display(),
                meta.uid()
            )
        })
}
