//! vmwatch-master: authenticates node messages, keeps the inventory and journal, serves the API.
//!
//! config → run → drain: the configuration is validated completely before any socket is bound
//! (a bad one exits with status 78); the database, the ZeroMQ port and the HTTP port are all
//! opened before READY=1; SIGTERM stops intake, lets the core commit what it holds, and exits.
#![forbid(unsafe_code)]

mod api;
mod config;
mod core;
mod duplicate;
#[cfg(test)]
mod fuzz;
mod idle;
mod ingest;
mod metrics;
mod retention;
mod rules;
mod serve;
mod store;
mod webhook;

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmwatch_common::config::{is_world_readable, Cli, EX_CONFIG};
use vmwatch_common::logging::{self, LogFile};
use vmwatch_common::time::now_ms;

const DEFAULT_LOG: &str = "/var/log/vmwatch-master.log";

fn main() -> ExitCode {
    let cli = match Cli::parse(std::env::args().skip(1), config::DEFAULT_PATH) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmwatch-master: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.help {
        print!("{}", Cli::usage("vmwatch-master", config::DEFAULT_PATH));
        return ExitCode::SUCCESS;
    }
    if cli.version {
        println!("vmwatch-master {}", vmwatch_common::VERSION);
        return ExitCode::SUCCESS;
    }
    let config = match config::MasterConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmwatch-master: bad configuration: {e}");
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
    if let Some(node) = &cli.node_secret {
        let node = match vmwatch_common::protocol::NodeId::parse(node) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("vmwatch-master: --node-secret: {e}");
                return ExitCode::from(64);
            }
        };
        return match config.node_config_lines(&node) {
            Some(lines) => {
                print!("{lines}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("vmwatch-master: --node-secret needs `secret` in the configuration");
                ExitCode::from(EX_CONFIG as u8)
            }
        };
    }
    let log = match LogFile::open(&config.log_file) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "vmwatch-master: cannot open log file {}: {e}; logging to stderr",
                config.log_file.display()
            );
            LogFile::stderr()
        }
    };
    if let Err(e) = logging::init(log.clone(), &config.log_level) {
        eprintln!("vmwatch-master: {e}");
        return ExitCode::from(EX_CONFIG as u8);
    }
    if config.disabled {
        tracing::info!("vmwatch-master is disabled (disabled=yes); exiting");
        // Type=notify: without READY=1 an exit 0 would be a start failure to systemd, and
        // systemd must have read it before we exit (the barrier), or it sees the exit first.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        notify_barrier(std::time::Duration::from_secs(5));
        return ExitCode::SUCCESS;
    }
    if config.node_keys == config::NodeKeys::Shared {
        tracing::warn!("node_keys=shared: every node signs with the master secret, so any hypervisor can sign as any other; switch to node_keys=derived (vmwatch-master --node-secret NODE_ID)");
    }
    if is_world_readable(&cli.config) {
        tracing::warn!(path = %cli.config.display(), "configuration file holding secrets is world-readable; chmod 0640 it");
    }
    match run(config, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("vmwatch-master: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: config::MasterConfig, log: LogFile) -> Result<(), String> {
    let config = Arc::new(config);
    let mut store = store::Store::open(&config.db_path).map_err(|e| e.to_string())?;
    if config.panel_url.is_some() {
        store.enable_outbox();
    }
    let inventory = store.load_inventory().map_err(|e| e.to_string())?;
    tracing::info!(nodes = inventory.nodes.len(), vms = inventory.vm_count(), db = %config.db_path.display(), "inventory loaded");
    let readers = Arc::new(api::ReaderPool::open(&config.db_path, 4).map_err(|e| e.to_string())?);
    let max_connections = ingest::raise_fd_limit(config.max_connections);
    let node_port = ingest::bind(&config, max_connections)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http_listen))
        .map_err(|e| format!("cannot listen for HTTP on {}: {e}", config.http_listen))?;

    let metrics = Arc::new(metrics::Metrics::new());
    metrics
        .journal_size
        .set(store.journal_size().map_err(|e| e.to_string())? as i64);
    let outbox = match &config.panel_url {
        Some(_) => {
            let outbox = store::Outbox::open(&config.db_path).map_err(|e| e.to_string())?;
            // The core adds what it commits and acknowledgements subtract, so the gauge stays
            // true while the head entry is being retried; it starts from the stored backlog.
            metrics.outbox_depth.set(
                outbox
                    .depth()
                    .map(|d| d as i64)
                    .map_err(|e| e.to_string())?,
            );
            metrics.dead_letters.set(
                outbox
                    .dead_letter_count()
                    .map(|d| d as i64)
                    .map_err(|e| e.to_string())?,
            );
            Some(outbox)
        }
        None => None,
    };
    let reject_log = Arc::new(metrics::RejectLog::new(Duration::from_secs(10)));
    let (committed, _) = tokio::sync::watch::channel(0u64);
    let (stopping, _) = tokio::sync::watch::channel(false);
    let (vm_changes, _) = tokio::sync::broadcast::channel(1024);
    let shared = Arc::new(core::Shared {
        committed,
        vm_changes,
        last_turn_ms: AtomicU64::new(now_ms()),
        db_ok: AtomicBool::new(true),
        stopping,
    });
    let (to_core, from_ingest) = std::sync::mpsc::sync_channel(16_384);
    let core = core::Core {
        pending: None,
        store,
        inventory,
        rules: rules::Rules {
            max_nodes: config.max_nodes,
            max_clock_skew_ms: config.max_clock_skew * 1000,
            max_message_age_ms: config.max_message_age * 1000,
            node_timeout_ms: config.node_timeout * 1000,
            idle_windows: config.idle_windows,
            duplicate_grace_ms: config.duplicate_grace * 1000,
        },
        metrics: metrics.clone(),
        reject_log: reject_log.clone(),
        started_at: now_ms(),
        shared: shared.clone(),
        retention_days: config.event_retention_days,
    };
    let core_thread = core
        .spawn(from_ingest)
        .map_err(|e| format!("cannot spawn the core thread: {e}"))?;
    let ingest_thread = ingest::spawn(
        node_port,
        config.clone(),
        to_core,
        metrics.clone(),
        reject_log,
        shared.stopping.subscribe(),
    )
    .map_err(|e| format!("cannot spawn the ingest thread: {e}"))?;

    let state = api::AppState {
        db_path: config.db_path.clone(),
        readers,
        metrics,
        shared: shared.clone(),
        api_token: config
            .api_token
            .as_ref()
            .map(|t| Arc::new(String::from_utf8_lossy(t.expose()).into_owned())),
    };
    tracing::info!(listen = %config.listen, http = %config.http_listen, max_connections, node_keys = config.node_keys.as_str(), version = vmwatch_common::VERSION, "vmwatch-master started");
    let stop_rx = shared.stopping.subscribe();
    let webhook = match &config.panel_url {
        Some(url) => {
            // Checked with the rest of the configuration: never a node key.
            let Some(key) = config.panel_secret.as_ref().map(|s| s.expose().to_vec()) else {
                return Err("panel_url is set but panel_secret is not".into());
            };
            let Some(outbox) = outbox else {
                return Err("internal: outbox not opened".into());
            };
            let hook = webhook::Webhook {
                url: url.clone(),
                key,
                outbox,
                metrics: state.metrics.clone(),
                committed: shared.committed.subscribe(),
                shutdown: stop_rx,
            };
            Some(runtime.spawn(hook.run()))
        }
        None => None,
    };
    let metrics = state.metrics.clone();
    runtime.block_on(async {
        // Installed before the API answers: a SIGTERM from then on is always handled.
        let signals = Signals::install();
        let server = tokio::spawn(serve::serve(
            listener,
            api::router(state),
            metrics,
            shared.stopping.subscribe(),
            Duration::from_secs(2),
        ));
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        match signals {
            Ok(signals) => shutdown_signal(signals, log, shared.clone()).await,
            Err(e) => tracing::error!(error = %e, "cannot install signal handlers; stopping"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!("stopping: answering long-polls, draining HTTP, ingest and the core");
        // One stop signal: long-polls answer, the accept loop ends, the webhook stops, and
        // ingest stops reading while HTTP drains.
        shared.stopping.send_replace(true);
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP server task failed");
        }
    });
    if let Some(task) = webhook {
        let _ =
            runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), task).await });
    }
    let _ = ingest_thread.join();
    // The ingest thread held the only sender: the core commits what it has, then returns.
    let _ = core_thread.join();
    runtime.shutdown_timeout(Duration::from_secs(2));
    tracing::info!("vmwatch-master stopped");
    Ok(())
}

/// Waits until systemd has processed every notification sent so far (`BARRIER=1`: systemd
/// closes the pipe end we pass once it got there). A no-op outside systemd.
fn notify_barrier(timeout: Duration) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let Ok((read_end, write_end)) = nix::unistd::pipe() else {
        return;
    };
    if sd_notify::notify_with_fds(
        false,
        &[sd_notify::NotifyState::Custom("BARRIER=1")],
        &[write_end.as_fd()],
    )
    .is_err()
    {
        return;
    }
    drop(write_end);
    let mut fds = [nix::poll::PollFd::new(
        read_end.as_fd(),
        nix::poll::PollFlags::POLLHUP,
    )];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Needs the tokio runtime (call inside it).
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Resolves on SIGTERM or SIGINT; reopens the log on SIGHUP; pings the systemd watchdog while
/// the core loop is turning.
async fn shutdown_signal(signals: Signals, log: LogFile, shared: Arc<core::Shared>) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    let mut usec = 0u64;
    let watchdog =
        sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
    let mut tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return; }
            _ = int.recv() => { tracing::info!("SIGINT received"); return; }
            _ = hup.recv() => {
                match log.reopen() {
                    Ok(()) => tracing::info!("log file reopened (SIGHUP)"),
                    Err(e) => tracing::error!(error = %e, "cannot reopen the log file; still writing to the old one"),
                }
            }
            _ = tick.tick() => {
                let age = now_ms().saturating_sub(shared.last_turn_ms.load(Ordering::Relaxed));
                if watchdog.is_some() && age < 10_000 {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
        }
    }
}
