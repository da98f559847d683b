//! The master's wiring: opens everything before `READY=1`, serves until the shutdown token
//! fires, then drains each part within its own grace period.
//!
//! Order at start: database (inventory, outbox, bus cursor) → descriptor limit → ZAP handler +
//! CURVE PULL bind → HTTP bind → core and ingest threads, webhook, bus and HTTP tasks →
//! `READY=1`. At stop every part sees the one shutdown token at once: long-polls answer, the
//! accept loop ends, the webhook, the bus and ingest stop; ingest dropping its channel lets the core commit what it holds
//! and return. `run` then waits for each in turn, each within its own grace. If the core or
//! ingest thread ends on its own, its guard triggers the same shutdown and `run` fails.

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use vmwatch_common::daemon::{join_within, Context};

use crate::config::{MasterConfig, NodeKeys};
use crate::ingest::BindError;
use crate::store::{BusCursor, Outbox, Store, StoreError};
use crate::{api, bus, core, ingest, metrics, rules, serve, webhook};

// The graces of the drain, in the order they are waited for. Their sum with the runtime's
// 2 s (16 s) stays under the unit's TimeoutStopSec=20, so systemd never kills a drain that
// would still log its own overrun.
/// How long the HTTP side may take to finish open requests once stopping.
const HTTP_GRACE: Duration = Duration::from_secs(2);
const WEBHOOK_GRACE: Duration = Duration::from_secs(1);
/// The bus closes its broker connection (≤ 0.5 s); unconfirmed entries stay after its cursor.
const BUS_GRACE: Duration = Duration::from_secs(1);
/// Ingest sees the token within one poll (≤ 100 ms).
const INGEST_GRACE: Duration = Duration::from_secs(2);
/// The core commits what it holds; a refusing database makes it give up at once.
const CORE_GRACE: Duration = Duration::from_secs(8);
const RUNTIME_GRACE: Duration = Duration::from_secs(2);

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Http {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot spawn the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        source: std::io::Error,
    },
    #[error("{0} ended on its own")]
    PartFailed(&'static str),
    #[error("cannot execute vmwatch-master again after stepping down: {0}")]
    Exec(std::io::Error),
}

/// Runs the master until `ctx.shutdown` fires; returns once every part has drained. With
/// `ha=yes` it first serves as a standby until it holds the leader lease, and a leader that
/// loses the lease drains and executes itself again (`crate::ha`).
pub fn run(config: MasterConfig, ctx: Context) -> Result<(), MasterError> {
    crate::raw::tune_allocator();
    if config.disabled {
        tracing::info!("vmwatch-master is disabled (disabled=yes); exiting");
        // Type=notify: without READY=1 an exit 0 would be a start failure to systemd, and
        // systemd must have read it before we exit (the barrier), or it sees the exit first.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        notify_barrier(Duration::from_secs(5));
        return Ok(());
    }
    if config.node_keys == NodeKeys::Shared {
        tracing::warn!("node_keys=shared: every node signs with the master secret, so any hypervisor can sign as any other; switch to node_keys=derived (vmwatch-master --node-secret NODE_ID)");
    }
    let config = Arc::new(config);
    let metrics = Arc::new(metrics::Metrics::new());
    let ha_state = config
        .ha
        .as_ref()
        .map(|ha| Arc::new(crate::ha::HaState::new(&ha.name)));
    let held = match (&config.ha, &ha_state) {
        (Some(ha), Some(state)) => match standby(&config, ha, state, &metrics, &ctx)? {
            Some(held) => Some(held),
            None => return Ok(()),
        },
        _ => {
            metrics.ha_leader.set(1);
            None
        }
    };
    let epoch = held.as_ref().map(|(epoch, _)| *epoch);
    let running = start(
        config.clone(),
        &ctx,
        metrics.clone(),
        epoch,
        ha_state.clone(),
    )?;
    let stepped_down = Arc::new(AtomicBool::new(false));
    let keeper = match (held, &config.ha, &ha_state) {
        (Some((epoch, lease)), Some(ha), Some(state)) => {
            state
                .leader
                .store(true, std::sync::atomic::Ordering::Relaxed);
            state
                .epoch
                .store(epoch, std::sync::atomic::Ordering::Relaxed);
            metrics.ha_leader.set(1);
            metrics.ha_epoch.set(epoch);
            metrics.ha_transitions.inc();
            tracing::info!(epoch, name = %ha.name, "leader: holding the lease; the node port is open");
            let keeper = crate::ha::Keeper {
                lease,
                epoch,
                every: ha.lease / 3,
                lease_for: ha.lease,
            };
            let (state, metrics, shutdown, stepped_down) = (
                state.clone(),
                metrics.clone(),
                ctx.shutdown.clone(),
                stepped_down.clone(),
            );
            Some(
                std::thread::Builder::new()
                    .name("lease".into())
                    .spawn(move || keeper.run(state, metrics, shutdown, stepped_down))
                    .map_err(|source| MasterError::Spawn {
                        thread: "lease",
                        source,
                    })?,
            )
        }
        _ => None,
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    running.runtime.block_on(ctx.shutdown.triggered());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "stopping: answering long-polls, draining HTTP, the webhook, the bus, ingest and the core"
    );
    running.drain();
    if let Some(keeper) = keeper {
        let _ = keeper.join();
    }
    if stepped_down.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(exec_again());
    }
    match ctx.shutdown.failed() {
        Some(part) => Err(MasterError::PartFailed(part)),
        None => Ok(()),
    }
}

/// A leader that stepped down starts over as a standby: the same program, arguments and
/// process id (systemd and the pid file still name it), none of the old leader's state.
fn exec_again() -> MasterError {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| "vmwatch-master".into());
    tracing::info!("executing vmwatch-master again, to start as a standby");
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(args)
        .exec();
    MasterError::Exec(error)
}

/// The standby (SPEC §13): the API from the database, no node port, until this master holds
/// the leader lease (returned with its epoch) or is told to stop (`None`).
fn standby(
    config: &Arc<MasterConfig>,
    ha: &crate::config::Ha,
    state: &Arc<crate::ha::HaState>,
    metrics: &Arc<metrics::Metrics>,
    ctx: &Context,
) -> Result<Option<(i64, crate::store::Lease)>, MasterError> {
    // The schema, the lease's table included (migrations wait for each other).
    drop(Store::open(&config.database)?);
    metrics.ha_leader.set(0);
    let (runtime, listener) = runtime_and_listener(config, 1)?;
    let readers = Arc::new(api::ReaderPool::open(&config.database, 2)?);
    let (registry, _, _) = open_registry(config)?;
    // The standby's own stop: the daemon's shutdown, or this master taking the lease.
    let local = vmwatch_common::daemon::Shutdown::new();
    let shared = Arc::new(core::Shared {
        committed: tokio::sync::watch::channel(0u64).0,
        vm_changes: tokio::sync::broadcast::channel(1024).0,
        pulse: ctx.pulse.clone(),
        db_ok: AtomicBool::new(true),
        shutdown: local.clone(),
        registry: registry.clone(),
    });
    let server = runtime.spawn(serve::serve(
        listener,
        api::router(app_state(
            config,
            readers,
            metrics,
            shared.clone(),
            registry,
            Some(state.clone()),
        )),
        metrics.clone(),
        local.subscribe(),
        HTTP_GRACE,
    ));
    let stop_following = Arc::new(AtomicBool::new(false));
    let follower = {
        let (db, shared, stop) = (
            config.database.clone(),
            shared.clone(),
            stop_following.clone(),
        );
        std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match crate::store::Reader::open(&db) {
                        Ok(mut reader) => {
                            crate::ha::follow(&mut reader, &shared, &stop);
                            return;
                        }
                        Err(e) => {
                            shared.db_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                            shared.pulse.beat(vmwatch_common::time::now_ms());
                            tracing::warn!(error = %e, "standby: cannot open the database; retrying in 1 s");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .map_err(|source| MasterError::Spawn {
                thread: "standby",
                source,
            })?
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(name = %ha.name, http = %config.http_listen, lease_s = ha.lease.as_secs(), version = vmwatch_common::VERSION, "vmwatch-master started as a standby: serving the API from the database; the node port opens when this master leads");
    let held = crate::ha::wait_for_lease(config, ha, state, metrics, &ctx.shutdown);
    stop_following.store(true, std::sync::atomic::Ordering::Relaxed);
    local.trigger();
    let _ = runtime.block_on(async { tokio::time::timeout(HTTP_GRACE, server).await });
    runtime.shutdown_timeout(RUNTIME_GRACE);
    let _ = follower.join();
    Ok(held?)
}

/// Every part of a started master, to be drained.
struct Running {
    runtime: tokio::runtime::Runtime,
    server: tokio::task::JoinHandle<()>,
    webhook: Option<tokio::task::JoinHandle<()>>,
    bus: Option<tokio::task::JoinHandle<()>>,
    ingest_thread: std::thread::JoinHandle<()>,
    core_thread: std::thread::JoinHandle<()>,
}

/// Opens, binds and spawns every part; nothing has been announced to systemd yet.
fn start(
    config: Arc<MasterConfig>,
    ctx: &Context,
    metrics: Arc<metrics::Metrics>,
    epoch: Option<i64>,
    ha: Option<Arc<crate::ha::HaState>>,
) -> Result<Running, MasterError> {
    let (store, inventory, outbox, bus_cursor) = open_database(&config, &metrics, epoch)?;
    let readers = Arc::new(api::ReaderPool::open(&config.database, 4)?);
    let (registry, registry_db, fleet) = open_registry(&config)?;
    let max_connections = ingest::raise_fd_limit(config.max_connections);
    let node_port = ingest::bind(&config, max_connections, fleet)?;
    let (runtime, listener) = runtime_and_listener(&config, 2)?;

    let reject_log = Arc::new(metrics::RejectLog::new(Duration::from_secs(10)));
    let shared = Arc::new(core::Shared {
        committed: tokio::sync::watch::channel(0u64).0,
        vm_changes: tokio::sync::broadcast::channel(1024).0,
        pulse: ctx.pulse.clone(),
        db_ok: AtomicBool::new(true),
        shutdown: ctx.shutdown.clone(),
        registry: registry.clone(),
    });
    let (to_core, from_ingest) = std::sync::mpsc::sync_channel(16_384);
    let core = core::Core::new(
        store,
        inventory,
        rules_of(&config),
        crate::retention::Retention {
            journal_days: config.event_retention_days,
            activity_days: config.activity_retention_days,
        },
        metrics.clone(),
        reject_log.clone(),
        shared.clone(),
    );
    let spawn_error = |thread| move |source| MasterError::Spawn { thread, source };
    let core_thread = core.spawn(from_ingest).map_err(spawn_error("core"))?;
    // Off the core's path: one call takes 7-9 ms at 500,000 rows (39 ms after a fleet's
    // snapshots). It ends with the shutdown token; nothing waits for it.
    let shutdown = ctx.shutdown.clone();
    std::thread::Builder::new()
        .name("trim".into())
        .spawn(move || {
            while !shutdown.wait_timeout(TRIM_EVERY) {
                let took = crate::raw::release_free_memory();
                tracing::debug!(
                    took_us = took.as_micros() as u64,
                    "freed heap memory given back to the kernel"
                );
            }
        })
        .map_err(spawn_error("trim"))?;
    let ingest_thread = ingest::spawn(
        node_port,
        ingest::Parts {
            config: config.clone(),
            to_core,
            metrics: metrics.clone(),
            reject_log,
            shutdown: ctx.shutdown.clone(),
            registry: registry.clone(),
            registry_db,
        },
    )
    .map_err(spawn_error("zmq-pull"))?;

    let webhook = config.panel.as_ref().zip(outbox).map(|(panel, outbox)| {
        runtime.spawn(
            webhook::Webhook {
                url: panel.url.clone(),
                key: panel.secret.expose().to_vec(),
                batch_max: panel.batch_max,
                outbox,
                metrics: metrics.clone(),
                committed: shared.committed.subscribe(),
                shutdown: ctx.shutdown.subscribe(),
            }
            .run(),
        )
    });
    let bus = config.bus.as_ref().zip(bus_cursor).map(|(b, cursor)| {
        runtime.spawn(
            bus::Bus {
                url: b.url.clone(),
                exchange: b.exchange.clone(),
                cursor,
                metrics: metrics.clone(),
                committed: shared.committed.subscribe(),
                shutdown: ctx.shutdown.subscribe(),
            }
            .run(),
        )
    });
    let state = app_state(&config, readers, &metrics, shared, registry, ha);
    let server = runtime.spawn(serve::serve(
        listener,
        api::router(state),
        metrics,
        ctx.shutdown.subscribe(),
        HTTP_GRACE,
    ));
    tracing::info!(listen = %config.listen, http = %config.http_listen, max_connections, node_keys = config.node_keys.as_str(), version = vmwatch_common::VERSION, "vmwatch-master started");
    Ok(Running {
        runtime,
        server,
        webhook,
        bus,
        ingest_thread,
        core_thread,
    })
}

/// How often freed heap memory is given back to the kernel (see
/// [`crate::raw::release_free_memory`]): bursts (a fleet's snapshots, a backlog after an outage)
/// leave it in glibc's per-thread arenas otherwise.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The registry of enrolled nodes: public keys a migration could not compute are filled in,
/// and whether the fleet key is still accepted is decided (the setting, else the database's
/// age). Returns the shared registry, its own connection for ingest, and that decision.
fn open_registry(
    config: &MasterConfig,
) -> Result<(Arc<crate::registry::Shared>, crate::store::Registry, bool), StoreError> {
    let mut db = crate::store::Registry::open(&config.database)?;
    let filled = db.fill_public_keys(|n| {
        config
            .node_public_key(n)
            .map(|k| vmwatch_common::keys::z85_encode(&k))
    })?;
    let snapshot = crate::registry::load(&mut db, config)?;
    let legacy = db.fleet_transport()?;
    let fleet = config.allow_fleet_transport.unwrap_or(legacy);
    if fleet {
        tracing::warn!(
            enrolled = snapshot.enrolled_count(),
            setting = ?config.allow_fleet_transport,
            database_predates_node_keys = legacy,
            "the old fleet transport key is still accepted: any hypervisor holding it can open a connection; move each node to its own node_key (README, \"Moving nodes to their own keys\"), then set allow_fleet_transport=no"
        );
    }
    tracing::info!(
        enrolled = snapshot.enrolled_count(),
        keys_filled = filled,
        fleet_key = fleet,
        "node registry loaded"
    );
    Ok((Arc::new(crate::registry::Shared::new(snapshot)), db, fleet))
}

/// The database: the writer with the inventory it holds, the outbox when a panel is set and
/// the bus cursor when a bus is. The metrics start from what is stored.
fn open_database(
    config: &MasterConfig,
    metrics: &metrics::Metrics,
    epoch: Option<i64>,
) -> Result<(Store, rules::Inventory, Option<Outbox>, Option<BusCursor>), StoreError> {
    let mut store = Store::open(&config.database)?;
    if let Some(epoch) = epoch {
        store.fence(epoch);
    }
    if config.panel.is_some() {
        store.enable_outbox();
    }
    let bus_cursor = match &config.bus {
        Some(_) => {
            store.enable_bus()?;
            let mut cursor = BusCursor::open(&config.database)?;
            if let Some(epoch) = epoch {
                cursor.fence(epoch);
            }
            metrics
                .bus_lag
                .set(cursor.journal_end()?.saturating_sub(cursor.position()?));
            Some(cursor)
        }
        None => None,
    };
    let inventory = store.load_inventory()?;
    tracing::info!(nodes = inventory.nodes.len(), vms = inventory.vm_count(), db = %config.database, "inventory loaded");
    metrics.journal_size.set(store.journal_size()? as i64);
    let outbox = match &config.panel {
        Some(_) => {
            let mut outbox = Outbox::open(&config.database)?;
            if let Some(epoch) = epoch {
                outbox.fence(epoch);
            }
            // The core adds what it commits and acknowledgements subtract, so the gauge stays
            // true while the head entry is being retried; it starts from the stored backlog.
            metrics.outbox_depth.set(outbox.depth()? as i64);
            metrics.dead_letters.set(outbox.dead_letter_count()? as i64);
            Some(outbox)
        }
        None => None,
    };
    Ok((store, inventory, outbox, bus_cursor))
}

/// The async runtime (`workers` threads) and the HTTP listener it serves on.
fn runtime_and_listener(
    config: &MasterConfig,
    workers: usize,
) -> Result<(tokio::runtime::Runtime, tokio::net::TcpListener), MasterError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .map_err(MasterError::Runtime)?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.http_listen))
        .map_err(|source| MasterError::Http {
            addr: config.http_listen,
            source,
        })?;
    Ok((runtime, listener))
}

/// The API's state, the same for a leader and a standby.
fn app_state(
    config: &Arc<MasterConfig>,
    readers: Arc<api::ReaderPool>,
    metrics: &Arc<metrics::Metrics>,
    shared: Arc<core::Shared>,
    registry: Arc<crate::registry::Shared>,
    ha: Option<Arc<crate::ha::HaState>>,
) -> api::AppState {
    api::AppState {
        registry,
        config: config.clone(),
        database: config.database.clone(),
        readers,
        metrics: metrics.clone(),
        shared,
        api_token: config
            .api_token
            .as_ref()
            .map(|t| Arc::new(String::from_utf8_lossy(t.expose()).into_owned())),
        bus: config.bus.is_some(),
        idle: api::IdleSettings {
            tx_packets_max: config.idle_tx_packets_max,
            wr_reqs_max: config.idle_wr_reqs_max,
            windows: config.idle_windows,
        },
        ha,
    }
}

fn rules_of(config: &MasterConfig) -> rules::Rules {
    rules::Rules {
        max_nodes: config.max_nodes,
        max_clock_skew_ms: config.max_clock_skew * 1000,
        max_message_age_ms: config.max_message_age * 1000,
        node_timeout_ms: config.node_timeout * 1000,
        idle_windows: config.idle_windows,
        idle_tx_packets_max: config.idle_tx_packets_max,
        idle_wr_reqs_max: config.idle_wr_reqs_max,
        duplicate_grace_ms: config.duplicate_grace * 1000,
        max_vms_per_node: config.max_vms_per_node,
        min_stats_interval_ms: config.min_stats_interval * 1000,
        activity_min_window_ms: config.activity_min_window * 1000,
    }
}

impl Running {
    /// Waits for each part in turn, each within its own grace, and logs any that overruns.
    fn drain(self) {
        self.runtime.block_on(async {
            // serve() bounds its own drain by HTTP_GRACE and logs when it runs out.
            if let Err(e) = self.server.await {
                tracing::error!(error = %e, "HTTP server task failed");
            }
            if let Some(mut task) = self.webhook {
                if tokio::time::timeout(WEBHOOK_GRACE, &mut task).await.is_err() {
                    task.abort();
                    tracing::warn!(
                        grace_ms = WEBHOOK_GRACE.as_millis() as u64,
                        "the webhook did not stop within its grace period; its delivery in flight is aborted (the entry stays in the outbox)"
                    );
                }
            }
            if let Some(mut task) = self.bus {
                if tokio::time::timeout(BUS_GRACE, &mut task).await.is_err() {
                    task.abort();
                    tracing::warn!(
                        grace_ms = BUS_GRACE.as_millis() as u64,
                        "the event bus did not stop within its grace period; entries it had not had confirmed are published again at the next start"
                    );
                }
            }
        });
        // Ingest holds the only sender: once it ends, the core commits what it has and returns.
        join_within(self.ingest_thread, INGEST_GRACE, "the ingest thread");
        join_within(self.core_thread, CORE_GRACE, "the core thread");
        self.runtime.shutdown_timeout(RUNTIME_GRACE);
    }
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
