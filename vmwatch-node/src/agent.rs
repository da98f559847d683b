//! The node's shell: drives [`NodeCore`] with libvirt, the PUSH socket, the clocks and systemd.
//!
//! One thread owns the core, the libvirt connection and the socket. Facts reach it on one
//! channel: from the libvirt adapter's facts thread (events, closes) and from the stats thread
//! (counters, collected on a connection of its own so a slow stats call never delays an event).
//! Every decision is the core's; this file only performs [`Action`]s and reports their results.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use vmwatch_common::daemon::{join_within, Context, Shutdown};
use vmwatch_common::time::now_ms;

use crate::config::NodeConfig;
use crate::core::{Action, CoreConfig, Input, NodeCore, Notify, Now, Transmit};
use crate::libvirt::{self, Conn, LibvirtError, Watch};
use crate::socket::{PushSocket, SocketError};

const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;
/// The longest the loop waits, so that the shutdown is seen promptly.
const TICK: Duration = Duration::from_millis(100);
/// How long the drain may take to hand `bye` and the rest of the queue to the master.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot start the libvirt event loop: {0}")]
    EventLoop(#[source] LibvirtError),
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("cannot spawn the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        source: std::io::Error,
    },
}

/// Runs the node until the shutdown token fires, then says `bye` and drains (bounded).
pub fn run(config: NodeConfig, ctx: Context) -> Result<(), NodeError> {
    crate::allocator::one_arena();
    // The default event implementation must exist before the first connection is opened.
    libvirt::start_event_loop().map_err(NodeError::EventLoop)?;
    let socket = PushSocket::connect(&config.connect, config.send_queue, &config.curve)?;
    let (tx, rx) = mpsc::channel();
    let stats = spawn_stats_collector(
        config.libvirt_uri.clone(),
        Duration::from_secs(config.stats_interval),
        tx.clone(),
        ctx.shutdown.clone(),
    )
    .map_err(|source| NodeError::Spawn {
        thread: "stats",
        source,
    })?;
    let core = NodeCore::new(
        CoreConfig {
            node_id: config.node_id.clone(),
            secret: config.secret.clone(),
            stats_interval: Duration::from_secs(config.stats_interval),
            snapshot_interval: Duration::from_secs(config.snapshot_interval),
            heartbeat_interval: Duration::from_secs(config.heartbeat_interval),
        },
        uuid::Uuid::new_v4().to_string(),
        hostname(),
        now(),
    );
    tracing::info!(
        node_id = %config.node_id,
        connect = %config.connect,
        libvirt_uri = %config.libvirt_uri,
        version = vmwatch_common::VERSION,
        curve_key = config.curve.source.as_str(),
        curve_public = %vmwatch_common::keys::z85_encode(&config.curve.transport.public),
        "vmwatch-node started"
    );
    match config.curve.source {
        crate::config::KeySource::DerivedFromSecret => tracing::warn!(
            "no master_key/node_key set: the CURVE keys are derived from `secret`, which the master accepts only with node_keys=shared and this node enrolled; with node_keys=derived write the lines `vmwatch-master enroll NODE_ID` prints"
        ),
        crate::config::KeySource::FleetKey => tracing::warn!(
            "transport_key is the old fleet key, accepted only while the master has allow_fleet_transport=yes; write the node_key line `vmwatch-master enroll NODE_ID` prints"
        ),
        crate::config::KeySource::NodeKey => {}
    }
    let mut shell = Shell {
        uri: config.libvirt_uri,
        core,
        socket,
        connection: None,
        tx,
    };
    while !ctx.shutdown.is_triggered() {
        ctx.pulse.beat(now_ms());
        shell.turn();
        shell.wait(&rx);
    }
    shell.core.handle(now(), Input::Stop);
    shell.turn();
    shell.drain();
    // The stats thread sees the token between collections; one stuck in libvirt is left.
    join_within(stats, Duration::from_secs(2), "the stats thread");
    Ok(())
}

/// A libvirt connection with its callbacks (the watch holds a reference of its own).
struct Connection {
    _watch: Watch,
    conn: Conn,
}

struct Shell {
    uri: String,
    core: NodeCore,
    socket: PushSocket,
    connection: Option<Connection>,
    /// Handed to each new [`Watch`].
    tx: Sender<Input>,
}

impl Shell {
    /// Fires due timers, performs every action, then sends what the socket takes.
    fn turn(&mut self) {
        if self.socket.service(Instant::now()) {
            self.core.handle(now(), Input::MasterConnected);
        }
        self.core.handle_timeout(now());
        while let Some(action) = self.core.poll_action() {
            self.perform(action);
        }
        while let Some(m) = self.core.poll_transmit() {
            let (kind, seq) = (m.kind, m.seq);
            let result = self.socket.try_send(m);
            // A hop of `vmwatch-bench-latency`'s breakdown.
            tracing::debug!(kind, seq, result = ?result, "handed to the socket");
            let full = result == Transmit::Full;
            self.core.transmitted(result);
            if full {
                break;
            }
        }
    }

    /// Waits for one input, at most until the core's next timer (or a socket retry).
    fn wait(&mut self, rx: &Receiver<Input>) {
        let now = Instant::now();
        let mut until = now + TICK;
        if let Some(t) = self.core.poll_timeout() {
            until = until.min(t);
        }
        if self.core.wants_retry() {
            until = until.min(now + crate::core::RETRY_FULL);
        }
        match rx.recv_timeout(until.saturating_duration_since(now)) {
            Ok(input) => self.core.handle(self::now(), input),
            // The shell holds a sender itself, so the channel never disconnects.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }

    fn perform(&mut self, action: Action) {
        let input = match action {
            Action::Connect { generation } => self.connect(generation),
            Action::ListDomains => match &self.connection {
                Some(c) => match libvirt::list_domains(&c.conn) {
                    Ok(domains) => Input::Listed(domains),
                    Err(e) => Input::ListFailed {
                        error: e.to_string(),
                        alive: libvirt::is_alive(&c.conn),
                    },
                },
                None => Input::ListFailed {
                    error: "not connected".into(),
                    alive: false,
                },
            },
            Action::Release => {
                self.connection = None;
                return;
            }
            Action::Notify(n) => {
                let state = match n {
                    Notify::Ready => sd_notify::NotifyState::Ready,
                    Notify::Stopping => sd_notify::NotifyState::Stopping,
                };
                let _ = sd_notify::notify(false, &[state]);
                return;
            }
        };
        self.core.handle(now(), input);
    }

    fn connect(&mut self, generation: u64) -> Input {
        let opened =
            libvirt::open(&self.uri, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT).and_then(|conn| {
                Watch::register(&conn, generation, &self.tx).map(|watch| (conn, watch))
            });
        match opened {
            Ok((conn, watch)) => {
                let libvirt_version = libvirt::libvirt_version(&conn);
                tracing::info!(uri = %self.uri, version = %libvirt_version, "connected to libvirt");
                self.connection = Some(Connection {
                    _watch: watch,
                    conn,
                });
                Input::Connected {
                    generation,
                    libvirt_version,
                }
            }
            Err(e) => Input::ConnectFailed {
                error: e.to_string(),
            },
        }
    }

    /// Hands the rest of the queue (ending with `bye`) to libzmq within [`DRAIN_GRACE`], then
    /// lets libzmq flush for what is left of it.
    fn drain(mut self) {
        let deadline = Instant::now() + DRAIN_GRACE;
        while !self.core.is_drained() && Instant::now() < deadline {
            self.turn();
            if self.core.wants_retry() {
                std::thread::sleep(crate::core::RETRY_FULL);
            }
        }
        if !self.core.is_drained() {
            tracing::warn!(
                pending = self.core.queued(),
                grace_ms = DRAIN_GRACE.as_millis() as u64,
                "the drain's grace ran out with messages unsent"
            );
        }
        let counters = self.core.counters();
        self.connection = None;
        self.socket
            .close(deadline.saturating_duration_since(Instant::now()));
        tracing::info!(
            sent = counters.sent,
            dropped = counters.dropped,
            "node drained"
        );
    }
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        unix_ms: now_ms(),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Collects counters on a connection and thread of its own, right after start and then every
/// `interval` (fixed rate). Each collection goes to the core as one [`Input::Counters`].
fn spawn_stats_collector(
    uri: String,
    interval: Duration,
    tx: Sender<Input>,
    shutdown: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let retry = interval.min(Duration::from_secs(5));
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            let mut conn: Option<Conn> = None;
            let mut next = Instant::now();
            while !shutdown.wait_timeout(next.saturating_duration_since(Instant::now())) {
                let c: &Conn = match conn {
                    Some(ref c) => c,
                    None => match libvirt::open(&uri, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "stats: libvirt unavailable");
                            next = Instant::now() + retry;
                            continue;
                        }
                    },
                };
                let started = Instant::now();
                match libvirt::all_domain_counters(c) {
                    Ok(counters) => {
                        tracing::debug!(
                            domains = counters.len(),
                            took_ms = started.elapsed().as_millis() as u64,
                            "stats collected"
                        );
                        if tx.send(Input::Counters(counters)).is_err() {
                            break;
                        }
                        next += interval;
                        if next < Instant::now() {
                            // Missed windows (a very slow call): start counting from now.
                            next = Instant::now() + interval;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stats collection failed");
                        if !libvirt::is_alive(c) {
                            conn = None;
                        }
                        next = Instant::now() + retry;
                    }
                }
            }
        })
}
