//! The ZeroMQ PULL socket, in a thread of its own: admit connections, receive, authenticate,
//! hand over.
//!
//! Before a peer may send a single message frame it must complete a CURVE handshake against the
//! master's key (derived from `secret`) and present the fleet transport key, which the ZAP
//! handler below checks. A peer without it is dropped in the handshake, so the unauthenticated
//! cost of a connection is libzmq's handshake state, bounded in time (`ZMQ_HANDSHAKE_IVL`) and in
//! number (`max_connections`, enforced from the socket monitor: a connection accepted beyond the
//! cap is shut down at once). TCP keepalive (60 s idle, 3 probes 10 s apart) drops peers that
//! vanished. Not ZMTP heartbeats: under back-pressure libzmq stops reading a connection, so its
//! PONGs go unread too, and the heartbeat timeout would drop every node (losing what was in
//! flight) whenever the core is slower than the nodes for 30 s.
//!
//! libzmq enforces `ZMQ_MAXMSGSIZE` per frame; this thread keeps at most five frames of any
//! message (more is already a `frame_count` rejection). Authentication (frames, node id, HMAC)
//! happens here; the stateful checks happen in the core thread. Accepted messages go to the core
//! through a bounded channel: when it is full this thread stops reading (libzmq's queues push
//! back to the nodes) but keeps answering ZAP and the monitor.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmwatch_common::daemon::Shutdown;
use vmwatch_common::keys;
use vmwatch_common::protocol::{authenticate, Authenticated, NodeId, Reject, Rejected};

use crate::config::MasterConfig;
use crate::containment::{self, Connections, Limits};
use crate::metrics::{Metrics, ReasonLabel, RejectLog};
use crate::registry;

/// What the ingest thread hands to the core.
pub struct Received {
    pub message: Authenticated,
    /// Unix ms when it was read off the socket: its age is judged from then, so what the
    /// master itself held (a full disk) is never rejected as too old.
    pub arrived: u64,
}

/// The ZAP endpoint libzmq asks (RFC 27).
const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
const MONITOR_ENDPOINT: &str = "inproc://vmwatch-node-port-monitor";
/// A peer must finish the CURVE handshake within this time.
const HANDSHAKE_MS: i32 = 10_000;
/// Descriptors kept beyond `max_connections` for the database, HTTP and the log.
const FD_RESERVE: u64 = 1024;
/// The kernel's receive buffer per node connection (`ZMQ_RCVBUF`): small and fixed, so what a
/// connection has received but libzmq not yet read stays small too (autotuning grows it to
/// 6 MiB), and still a window of 512 KiB (the kernel doubles it).
const RCVBUF: i32 = 256 * 1024;
/// How often the registry's version is read (a CLI enrollment or revocation is seen within it).
const REGISTRY_POLL: Duration = Duration::from_millis(200);
/// How long after a push-back libzmq's pipes may still hold whole messages ingest has not read
/// (it drains them within a few turns once the core takes messages again).
const PUSH_BACK_MEMORY: Duration = Duration::from_secs(1);
/// The containment check runs at least this often, and at once when the process grew by
/// [`GROWTH_TRIGGER`] since the last check.
const CHECK_MIN: Duration = Duration::from_millis(20);
const CHECK_MAX: Duration = Duration::from_secs(1);
const GROWTH_TRIGGER: u64 = 4 * 1024 * 1024;

/// Raises the soft descriptor limit so `max_connections` fit with [`FD_RESERVE`] to spare, and
/// returns the connection cap that fits (lower than configured if the hard limit is too low).
pub fn raise_fd_limit(max_connections: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = max_connections as u64 + FD_RESERVE;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let target = want.min(hard);
    if target > soft {
        match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
            Ok(()) => tracing::info!(from = soft, to = target, "descriptor limit raised"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
        }
    }
    let have = getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(soft);
    let fits = have.saturating_sub(FD_RESERVE).max(16) as usize;
    if fits < max_connections {
        tracing::warn!(
            max_connections,
            descriptor_limit = have,
            cap = fits,
            "the descriptor limit does not fit max_connections; raise LimitNOFILE; capping connections lower"
        );
        return fits;
    }
    max_connections
}

/// Why the node port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("no secret: the CURVE keys cannot be derived")]
    NoSecret,
    #[error("{step}: {source}")]
    Zmq {
        step: &'static str,
        source: zmq::Error,
    },
    #[error("cannot listen on {endpoint}: {source}")]
    Listen {
        endpoint: String,
        source: zmq::Error,
    },
}

fn zmq_err(step: &'static str) -> impl Fn(zmq::Error) -> BindError {
    move |source| BindError::Zmq { step, source }
}

/// The bound node port and its helpers, all in one ZeroMQ context. Fields drop in order: the
/// sockets before the context (whose drop waits for every socket to close).
pub struct NodePort {
    pull: zmq::Socket,
    zap: zmq::Socket,
    monitor: zmq::Socket,
    // Held only to outlive the sockets.
    _ctx: zmq::Context,
    /// The fleet transport key, while it is still accepted (`allow_fleet_transport`).
    fleet_public: Option<[u8; 32]>,
    listen_port: u16,
    max_connections: usize,
}

/// Binds the ZAP handler, then the PULL socket (before anything else starts, so a busy port
/// fails at once). `fleet` says whether the fleet transport key is still accepted.
pub fn bind(
    config: &MasterConfig,
    max_connections: usize,
    fleet: bool,
) -> Result<NodePort, BindError> {
    let Some(secret) = config.secret.as_ref() else {
        return Err(BindError::NoSecret);
    };
    let server = keys::server_keypair(secret.expose());
    let ctx = zmq::Context::new();
    // The handler must be bound before any CURVE socket exists in this context.
    let zap = ctx.socket(zmq::REP).map_err(zmq_err("zap socket"))?;
    zap.set_linger(0).map_err(zmq_err("zap socket"))?;
    zap.bind(ZAP_ENDPOINT)
        .map_err(zmq_err("cannot bind the ZAP handler"))?;
    let pull = ctx.socket(zmq::PULL).map_err(zmq_err("zmq socket"))?;
    let setup = || -> Result<(), zmq::Error> {
        pull.set_curve_server(true)?;
        pull.set_curve_secretkey(&server.secret)?;
        pull.set_zap_domain("vmwatch")?;
        pull.set_handshake_ivl(HANDSHAKE_MS)?;
        pull.set_maxmsgsize(config.max_message_bytes)?;
        // Per connection: the nodes' own queues (`send_queue`) absorb a backlog, not our memory.
        pull.set_rcvhwm(1000)?;
        pull.set_rcvbuf(RCVBUF)?;
        // Many nodes reconnect at once after a master restart: a deep accept queue keeps
        // them from waiting a retry interval each (libzmq's default is 100).
        pull.set_backlog(1024)?;
        pull.set_linger(0)?;
        pull.set_tcp_keepalive(1)?;
        pull.set_tcp_keepalive_idle(60)?;
        pull.set_tcp_keepalive_intvl(10)?;
        pull.set_tcp_keepalive_cnt(3)?;
        pull.monitor(
            MONITOR_ENDPOINT,
            (zmq::SocketEvent::ACCEPTED as i32)
                | (zmq::SocketEvent::DISCONNECTED as i32)
                | (zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32)
                | (zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32)
                | (zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32),
        )?;
        Ok(())
    };
    setup().map_err(zmq_err("cannot configure the ZeroMQ socket"))?;
    let monitor = ctx.socket(zmq::PAIR).map_err(zmq_err("monitor socket"))?;
    monitor
        .connect(MONITOR_ENDPOINT)
        .map_err(zmq_err("cannot connect the socket monitor"))?;
    pull.bind(&config.listen)
        .map_err(|source| BindError::Listen {
            endpoint: config.listen.clone(),
            source,
        })?;
    // The port libzmq actually bound (not the configured string, which may say 0 or `*`).
    let listen_port = pull
        .get_last_endpoint()
        .ok()
        .and_then(Result::ok)
        .and_then(|e| e.rsplit(':').next().and_then(|p| p.parse().ok()))
        .unwrap_or(0);
    Ok(NodePort {
        _ctx: ctx,
        pull,
        zap,
        monitor,
        fleet_public: fleet.then(|| keys::transport_keypair(secret.expose()).public),
        listen_port,
        max_connections,
    })
}

/// What the ingest thread works with besides the socket.
pub struct Parts {
    pub config: Arc<MasterConfig>,
    pub to_core: SyncSender<Received>,
    pub metrics: Arc<Metrics>,
    pub reject_log: Arc<RejectLog>,
    pub shutdown: Shutdown,
    /// The enrolled nodes, shared with the core and the API.
    pub registry: Arc<registry::Shared>,
    /// The registry's table, polled for changes made by another process (the CLI).
    pub registry_db: crate::store::Registry,
}

pub fn spawn(port: NodePort, parts: Parts) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("zmq-pull".into())
        .spawn(move || {
            let _guard = parts.shutdown.guard("the ingest thread");
            run(port, parts)
        })
}

/// Keys of nodes that have authenticated once: deriving a node's key costs an HMAC per message
/// otherwise. A key enters only after it verified a message (a forged id never enters), and at
/// most `max` of them.
struct Keyring {
    keys: HashMap<NodeId, Vec<u8>>,
    max: usize,
    /// Whether the last message authenticated was its node's first (its key was derived).
    first_of_node: bool,
}

impl Keyring {
    fn authenticate(
        &mut self,
        frames: &[Vec<u8>],
        key_for: impl Fn(&NodeId) -> Option<Vec<u8>>,
    ) -> Result<Authenticated, Rejected> {
        let mut derived = None;
        let verified = authenticate(frames, |n| match self.keys.get(n) {
            Some(k) => Some(Cow::Borrowed(k.as_slice())),
            None => {
                derived = key_for(n);
                derived.clone().map(Cow::Owned)
            }
        });
        self.first_of_node = verified.is_ok() && derived.is_some();
        if let (Ok(m), Some(k)) = (&verified, derived) {
            if self.keys.len() < self.max {
                self.keys.insert(m.node_id().clone(), k);
            }
        }
        verified
    }
}

/// The core stopped taking messages: ingest ends.
struct CoreGone;

struct Ingest {
    port: NodePort,
    parts: Parts,
    keyring: Keyring,
    /// A message the core had no room for yet; while it waits, nothing more is read.
    pending: Option<Received>,
    /// When ingest last found the core's queue full (containment spares single connections
    /// for [`PUSH_BACK_MEMORY`] after it).
    pushed_back_at: Option<Instant>,
    /// Every node-port connection, for the cap, containment and revocation.
    conns: Connections,
    /// The registry as of this turn (read once a turn, not once a message).
    registry: Arc<registry::Snapshot>,
    /// When `/proc/self/statm` was last read.
    rss_read_at: Instant,
    limits: Limits,
    next_check: Instant,
    /// Resident memory at the last containment check, bytes.
    rss_at_check: u64,
    next_registry_poll: Instant,
    /// The registry version whose revoked nodes' connections are closed.
    registry_seen: i64,
    /// Whether the last registry poll failed (its warning is logged once per outage).
    registry_failing: bool,
    /// Node ids seen on connections that presented the fleet key.
    fleet_nodes: HashSet<String>,
    /// The node id the ZAP handler last admitted from each peer address, for the log line of a
    /// connection closed before any whole message named its node.
    admitted_from: HashMap<String, String>,
    zap_refusals: RateLimit,
}

/// At most one log line per 10 s, with the count of those suppressed.
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < Duration::from_secs(10) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

fn run(port: NodePort, parts: Parts) {
    let registry = parts.registry.get();
    let mut ingest = Ingest {
        keyring: Keyring {
            keys: HashMap::new(),
            max: parts.config.max_nodes,
            first_of_node: false,
        },
        limits: Limits::for_max_message(parts.config.max_message_bytes as u64),
        port,
        parts,
        pending: None,
        pushed_back_at: None,
        conns: Connections::default(),
        registry,
        rss_read_at: Instant::now(),
        next_check: Instant::now(),
        rss_at_check: rss_bytes(),
        next_registry_poll: Instant::now(),
        registry_seen: i64::MIN,
        registry_failing: false,
        fleet_nodes: HashSet::new(),
        admitted_from: HashMap::new(),
        zap_refusals: RateLimit {
            last: None,
            suppressed: 0,
        },
    };
    while !ingest.parts.shutdown.is_triggered() {
        if let Err(CoreGone) = ingest.turn() {
            return;
        }
    }
    if let Some(r) = ingest.pending.take() {
        // Stopping: the core is still draining and takes this last one.
        let _ = ingest.parts.to_core.send(r);
    }
}

/// One whole message read off the node port, with where it came from.
struct Incoming {
    /// At most five frames (more is already a `frame_count` rejection).
    frames: Vec<Vec<u8>>,
    /// Wire bytes of all its frames.
    wire: u64,
    fd: Option<RawFd>,
    /// The node id of the connection's CURVE key; `None` on a fleet-key connection.
    user_id: Option<String>,
}

impl Ingest {
    /// One poll: answers ZAP and the monitor, follows the registry, checks what connections
    /// hold, hands the held message on, then reads a burst.
    fn turn(&mut self) -> Result<(), CoreGone> {
        let port = &self.port;
        let mut items = [
            port.zap.as_poll_item(zmq::POLLIN),
            port.monitor.as_poll_item(zmq::POLLIN),
            port.pull.as_poll_item(if self.pending.is_none() {
                zmq::POLLIN
            } else {
                zmq::PollEvents::empty()
            }),
        ];
        // Short: the containment check runs between polls, and an attacker sending an
        // unfinished message never makes the socket readable.
        let timeout = 20;
        if let Err(e) = zmq::poll(&mut items, timeout) {
            tracing::error!(error = %e, "zmq poll failed");
            std::thread::sleep(Duration::from_millis(100));
            return Ok(());
        }
        let (zap_ready, monitor_ready) = (items[0].is_readable(), items[1].is_readable());
        if zap_ready {
            self.answer_zap_all();
        }
        if monitor_ready {
            while let Some(event) = monitor_event(&self.port.monitor) {
                self.on_event(event);
            }
        }
        let now = Instant::now();
        if now >= self.next_registry_poll {
            self.follow_registry();
            self.next_registry_poll = now + REGISTRY_POLL;
        }
        self.registry = self.parts.registry.get();
        self.contain(now);
        if let Some(r) = self.pending.take() {
            match self.parts.to_core.try_send(r) {
                Ok(()) => {}
                Err(TrySendError::Full(r)) => {
                    self.pending = Some(r);
                    self.pushed_back_at = Some(Instant::now());
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(CoreGone),
            }
        }
        self.read_burst()
    }

    fn answer_zap_all(&mut self) {
        let registry = self.parts.registry.get();
        while let Some(refused) = answer_zap(
            &self.port.zap,
            &registry,
            self.port.fleet_public.as_ref(),
            &mut self.admitted_from,
        ) {
            if let Some(refused) = refused {
                self.refused_handshake(refused);
            }
        }
    }

    fn refused_handshake(&mut self, (address, key): (String, String)) {
        if let Some(suppressed) = self.zap_refusals.allow(Instant::now()) {
            tracing::warn!(
                peer = %address,
                client_key = %key,
                suppressed_since_last = suppressed,
                "CURVE handshake refused: the client key is not an enrolled node's (unknown, revoked, or the fleet key while allow_fleet_transport=no) (logged at most once per 10s)"
            );
        }
    }

    /// Reads what is ready, one message at a time, up to a turn's worth (so ZAP and the
    /// monitor are answered between bursts), until the core has no room.
    fn read_burst(&mut self) -> Result<(), CoreGone> {
        for n in 0..1024 {
            if n % 64 == 63 {
                // Handshakes are not kept waiting behind a burst of messages.
                self.answer_zap_all();
                if self.parts.shutdown.is_triggered() {
                    break;
                }
            }
            let incoming = match receive(&mut self.port.pull) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "zmq receive failed");
                    break;
                }
            };
            if let Some(fd) = incoming.fd {
                self.conns
                    .delivered(fd, incoming.wire, incoming.user_id.as_deref());
            }
            let verified = self.check_identity(&incoming).and_then(|()| {
                let config = &self.parts.config;
                self.keyring
                    .authenticate(&incoming.frames, |n| config.key_for(n))
            });
            match verified {
                Ok(message) => {
                    // A hop of `vmwatch-bench-latency`'s breakdown.
                    tracing::debug!(node_id = %message.node_id().as_str(), kind = message.payload().body.kind(), seq = message.payload().seq, "authenticated");
                    // Checked once per node id, not once a message.
                    if incoming.user_id.is_none()
                        && self.port.fleet_public.is_some()
                        && self.keyring.first_of_node
                    {
                        self.note_fleet_node(message.node_id().as_str());
                    }
                    match self.parts.to_core.try_send(Received {
                        message,
                        arrived: vmwatch_common::time::now_ms(),
                    }) {
                        Ok(()) => {}
                        Err(TrySendError::Full(r)) => {
                            self.pending = Some(r);
                            self.pushed_back_at = Some(Instant::now());
                            break;
                        }
                        Err(TrySendError::Disconnected(_)) => return Err(CoreGone),
                    }
                }
                Err(r) => {
                    self.parts.metrics.count_reject(r.reason);
                    self.parts.reject_log.log(&r);
                }
            }
        }
        Ok(())
    }

    /// SPEC §10: frame 2 must name the node whose CURVE key the connection presented, and that
    /// node must still be enrolled. On a fleet-key connection (no `User-Id`) a revoked id is
    /// refused; the HMAC still binds every other id.
    fn check_identity(&mut self, m: &Incoming) -> Result<(), Rejected> {
        // Per message: no allocation, and the registry as of this turn.
        let named = m.frames.get(1).map(Vec::as_slice);
        let registry = self.registry.clone();
        let peer = || {
            m.fd.and_then(|fd| self.conns.get(fd))
                .and_then(|c| c.peer)
                .map_or_else(|| "-".to_owned(), |p| p.ip().to_string())
        };
        match (&m.user_id, named) {
            (Some(uid), Some(named)) if m.frames.len() == 4 && named != uid.as_bytes() => {
                Err(Rejected {
                    reason: Reject::IdentityMismatch,
                    node_id: Some(uid.clone()),
                    detail: format!(
                        "connection of node `{uid}` (User-Id) from {} sent a message naming {:?}",
                        peer(),
                        String::from_utf8_lossy(named)
                            .chars()
                            .take(64)
                            .collect::<String>()
                    ),
                })
            }
            (Some(uid), _) if !registry.is_enrolled(uid) => {
                let peer = peer();
                if let Some(fd) = m.fd {
                    self.close(fd, "revoked");
                }
                Err(Rejected {
                    reason: Reject::Revoked,
                    node_id: Some(uid.clone()),
                    detail: format!(
                        "node `{uid}` was revoked; its connection from {peer} is closed"
                    ),
                })
            }
            (None, Some(named))
                if registry.has_revoked()
                    && registry.is_revoked(&String::from_utf8_lossy(named)) =>
            {
                let named = String::from_utf8_lossy(named).into_owned();
                Err(Rejected {
                    reason: Reject::Revoked,
                    detail: format!(
                        "node `{named}` was revoked (fleet-key connection from {})",
                        peer()
                    ),
                    node_id: Some(named),
                })
            }
            _ => Ok(()),
        }
    }

    fn note_fleet_node(&mut self, node: &str) {
        if self.fleet_nodes.len() < self.parts.config.max_nodes && !self.fleet_nodes.contains(node)
        {
            self.fleet_nodes.insert(node.to_owned());
            self.parts
                .metrics
                .fleet_transport_nodes
                .set(self.fleet_nodes.len() as i64);
            tracing::warn!(node_id = %node, nodes_on_fleet_key = self.fleet_nodes.len(), "node connected with the old fleet transport key; give it its own key (`vmwatch-master enroll NODE_ID`, node_key=) before setting allow_fleet_transport=no");
        }
    }

    /// Reloads the registry when its version moved (an enrollment or revocation, here or by
    /// the CLI) and closes the connections of nodes no longer enrolled.
    fn follow_registry(&mut self) {
        let current = self.parts.registry.get();
        match self.parts.registry_db.version() {
            Ok(v) => {
                if std::mem::take(&mut self.registry_failing) {
                    tracing::info!("the node registry can be read again");
                }
                if v != current.version {
                    self.reload_registry();
                }
            }
            // Logged once per outage (the database's own failure is the core's to report).
            Err(e) => {
                if !std::mem::replace(&mut self.registry_failing, true) {
                    tracing::warn!(error = %e, "cannot read the node registry's version; the last one read stays in force, retrying every 0.2 s");
                }
            }
        }
        // The API may have installed a new registry itself: its revocations close here too.
        // One place follows every new registry, whoever installed it (this poll or the API):
        // the gauge and the revoked nodes' connections.
        let current = self.parts.registry.get();
        if current.version != self.registry_seen {
            self.registry_seen = current.version;
            self.parts
                .metrics
                .enrolled_nodes
                .set(current.enrolled_count() as i64);
            self.close_revoked();
        }
    }

    fn reload_registry(&mut self) {
        match registry::load(&mut self.parts.registry_db, &self.parts.config) {
            Ok(snapshot) => {
                self.parts.registry.set(snapshot);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the node registry; retrying");
            }
        }
    }

    fn close_revoked(&mut self) {
        let registry = self.parts.registry.get();
        let revoked: Vec<RawFd> = registry
            .rows
            .iter()
            .filter(|r| r.revoked_at.is_some())
            .flat_map(|r| self.conns.of_node(&r.node_id))
            .collect();
        for fd in revoked {
            self.close(fd, "revoked");
        }
    }

    /// SPEC §11: closes the connections holding more than their bound, checked every
    /// interval (longer with more connections: each costs a `TCP_INFO` call) and at once when
    /// the process grew fast.
    fn contain(&mut self, now: Instant) {
        // The growth trigger reads /proc at most every 5 ms.
        let mut grew = false;
        let mut rss = self.rss_at_check;
        if now.duration_since(self.rss_read_at) >= Duration::from_millis(5) {
            self.rss_read_at = now;
            rss = rss_bytes();
            grew = rss.saturating_sub(self.rss_at_check) > GROWTH_TRIGGER;
        }
        if now < self.next_check && !grew {
            return;
        }
        let every =
            (CHECK_MIN + Duration::from_micros(50) * self.conns.len() as u32).min(CHECK_MAX);
        self.next_check = now + every;
        self.rss_at_check = rss;
        // Pushing back within the last second: libzmq's pipes hold whole messages then.
        let pushing_back = self.pending.is_some()
            || self
                .pushed_back_at
                .is_some_and(|t| now.duration_since(t) < PUSH_BACK_MEMORY);
        let (verdicts, total) =
            self.conns
                .check(crate::raw::tcp_bytes_received, self.limits, pushing_back);
        self.parts.metrics.zmq_pending_bytes.set(total as i64);
        for v in verdicts {
            let (node, peer) = self.describe(v.fd);
            tracing::warn!(
                node_id = %node,
                peer = %peer,
                pending_bytes = v.pending,
                bound = match v.why {
                    containment::Why::Connection => self.limits.per_connection,
                    containment::Why::Total => self.limits.total,
                },
                reason = v.why.label(),
                "node connection closed: it sent more than the master holds for a connection before its messages are whole"
            );
            self.close(v.fd, v.why.label());
        }
    }

    /// The node id (or the one last admitted from its address) and peer of a connection.
    fn describe(&self, fd: RawFd) -> (String, String) {
        let conn = self.conns.get(fd);
        let peer = conn.and_then(|c| c.peer);
        let node = conn
            .and_then(|c| c.node.clone())
            .or_else(|| {
                peer.and_then(|p| self.admitted_from.get(&p.ip().to_string()))
                    .map(|n| format!("{n} (by address)"))
            })
            .unwrap_or_else(|| "-".into());
        (node, peer.map_or_else(|| "-".into(), |p| p.to_string()))
    }

    /// Shuts a node-port connection down (libzmq then sees it end and cleans up), counted by
    /// `why`. Only if the descriptor is still the connection we know: a socket on the node port
    /// whose peer is the address recorded when it was accepted, so a descriptor reused
    /// meanwhile by anything else, another node's connection included, is never touched.
    fn close(&mut self, fd: RawFd, why: &'static str) {
        let expected = self.conns.get(fd).and_then(|c| c.peer);
        if let Some(c) = self.conns.get_mut(fd) {
            c.closing = true;
        }
        if shutdown_if(fd, self.port.listen_port, expected) {
            self.parts
                .metrics
                .zmq_connections_closed
                .get_or_create(&ReasonLabel { reason: why })
                .inc();
        }
    }

    fn on_event(&mut self, (event, value): (u16, u32)) {
        let is = |e: zmq::SocketEvent| event == e as u16;
        let fd = value as RawFd;
        let metrics = &self.parts.metrics;
        if is(zmq::SocketEvent::ACCEPTED) {
            let from_address = self.conns.accepted(fd, peer_of(fd, self.port.listen_port));
            if self.conns.len() > self.port.max_connections {
                self.close(fd, "max_connections");
                self.parts.metrics.zmq_connections_refused.inc();
            } else if from_address > self.parts.config.max_connections_per_address {
                // One address (one hypervisor, or one attacker) cannot take every slot.
                self.close(fd, "per_address");
                self.parts.metrics.zmq_connections_refused.inc();
            }
        } else if is(zmq::SocketEvent::DISCONNECTED) {
            self.conns.gone(fd);
        } else {
            metrics.zmq_handshake_failures.inc();
        }
        self.parts
            .metrics
            .zmq_connections
            .set(self.conns.len() as i64);
    }
}

/// Answers one ZAP request (RFC 27): 200 with `User-Id` = the node id for an enrolled node's
/// key, 200 without a `User-Id` for the fleet key while it is accepted, 400 for anything else.
/// `None` when there was no request; `Some(Some((address, key)))` for a refusal.
fn answer_zap(
    zap: &zmq::Socket,
    registry: &registry::Snapshot,
    fleet_public: Option<&[u8; 32]>,
    admitted_from: &mut HashMap<String, String>,
) -> Option<Option<(String, String)>> {
    let frames = zap.recv_multipart(zmq::DONTWAIT).ok()?;
    // version, request id, domain, address, routing id, mechanism, credentials…
    let request_id = frames.get(1).cloned().unwrap_or_default();
    let well_formed = frames.len() == 7 && frames[0] == b"1.0" && frames[5] == b"CURVE";
    let key = if well_formed {
        frames[6].as_slice()
    } else {
        &[]
    };
    let address = frames
        .get(3)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .unwrap_or_default();
    let user: Option<&str> = if !well_formed {
        None
    } else if let Some(node) = registry.node_of_key(key) {
        Some(node)
    } else if fleet_public.is_some_and(|f| f.as_slice() == key) {
        Some("")
    } else {
        None
    };
    let (code, text, user_id): (&[u8], &[u8], &[u8]) = match user {
        Some(node) => (b"200", b"OK", node.as_bytes()),
        None => (b"400", b"unknown client key", b""),
    };
    let reply: [&[u8]; 6] = [b"1.0", &request_id, code, text, user_id, b""];
    if let Err(e) = zap.send_multipart(reply, zmq::DONTWAIT) {
        tracing::warn!(error = %e, "cannot answer a ZAP request");
    }
    Some(match user {
        Some(node) => {
            if admitted_from.len() >= 65_536 {
                admitted_from.clear();
            }
            let label = if node.is_empty() { "fleet key" } else { node };
            admitted_from.insert(address, label.to_owned());
            None
        }
        None => {
            let key = <&[u8; 32]>::try_from(key)
                .map(keys::z85_encode)
                .unwrap_or_else(|_| format!("({} bytes)", key.len()));
            Some((address, key))
        }
    })
}

/// One socket-monitor event: (event, value). For ACCEPTED and DISCONNECTED the value is the
/// connection's descriptor.
fn monitor_event(monitor: &zmq::Socket) -> Option<(u16, u32)> {
    let frames = monitor.recv_multipart(zmq::DONTWAIT).ok()?;
    let head = frames.first()?;
    if head.len() < 6 {
        return None;
    }
    let event = u16::from_ne_bytes([head[0], head[1]]);
    let value = u32::from_ne_bytes([head[2], head[3], head[4], head[5]]);
    Some((event, value))
}

/// The peer of a connection on the node port; `None` if `fd` is not one (any more).
fn peer_of(fd: RawFd, listen_port: u16) -> Option<SocketAddr> {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    let port_of = |a: SockaddrStorage| {
        a.as_sockaddr_in()
            .map(|v4| SocketAddr::from((v4.ip(), v4.port())))
            .or_else(|| {
                a.as_sockaddr_in6()
                    .map(|v6| SocketAddr::from((v6.ip(), v6.port())))
            })
    };
    let local = getsockname::<SockaddrStorage>(fd).ok().and_then(port_of)?;
    if local.port() != listen_port {
        return None;
    }
    getpeername::<SockaddrStorage>(fd).ok().and_then(port_of)
}

/// Shuts `fd` down if it is still a node-port connection to `expected` (when known; a
/// connection whose peer was never read is checked by port only). Returns whether it did.
fn shutdown_if(fd: RawFd, listen_port: u16, expected: Option<SocketAddr>) -> bool {
    use nix::sys::socket::{shutdown, Shutdown};
    let Some(peer) = peer_of(fd, listen_port) else {
        return false;
    };
    if expected.is_some_and(|e| e != peer) {
        return false;
    }
    shutdown(fd, Shutdown::Both).is_ok()
}

/// Resident memory of this process, bytes (0 if /proc cannot say).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

/// One whole multipart message, keeping at most five frames; `None` when nothing is ready.
fn receive(socket: &mut zmq::Socket) -> Result<Option<Incoming>, zmq::Error> {
    let first = match crate::raw::receive_frame(socket, zmq::DONTWAIT, true) {
        Ok(f) => f,
        Err(zmq::Error::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut m = Incoming {
        wire: containment::wire_bytes(first.data.len()),
        fd: first.fd,
        user_id: first.user_id,
        frames: vec![first.data],
    };
    let mut more = first.more;
    while more {
        let part = crate::raw::receive_frame(socket, 0, false)?;
        m.wire += containment::wire_bytes(part.data.len());
        if m.frames.len() < 5 {
            m.frames.push(part.data);
        }
        more = part.more;
    }
    Ok(Some(m))
}

#[cfg(test)]
mod tests {
    use vmwatch_common::protocol::{encode, Body, Bye, Payload, Reject};

    use super::*;

    fn frames(key: &[u8], node: &str) -> Vec<Vec<u8>> {
        let payload = Payload {
            boot: "b".into(),
            boot_ts: 1,
            seq: 1,
            ts: 2,
            body: Body::Bye(Bye {
                reason: "test".into(),
            }),
        };
        let node = NodeId::parse(node).expect("valid node id");
        encode(key, &node, &payload).into()
    }

    /// A key is kept only after it verified a message, and never more than `max`: a peer that
    /// sends a forged id or a wrong signature leaves nothing behind.
    #[test]
    fn the_keyring_keeps_only_keys_that_verified_a_message() {
        let key_for = |n: &NodeId| Some(format!("key-of-{}", n.as_str()).into_bytes());
        let mut ring = Keyring {
            keys: HashMap::new(),
            max: 2,
            first_of_node: false,
        };
        let forged = ring.authenticate(&frames(b"wrong", "hv-1"), key_for);
        assert_eq!(
            forged.map(|_| ()).map_err(|r| r.reason),
            Err(Reject::Signature)
        );
        assert!(ring.keys.is_empty());
        for node in ["hv-1", "hv-2", "hv-3"] {
            let key = format!("key-of-{node}");
            assert!(ring
                .authenticate(&frames(key.as_bytes(), node), key_for)
                .is_ok());
        }
        assert_eq!(ring.keys.len(), 2);
        // A cached key is used without deriving it again.
        let no_derivation = |_: &NodeId| None;
        assert!(ring
            .authenticate(&frames(b"key-of-hv-1", "hv-1"), no_derivation)
            .is_ok());
        assert!(ring
            .authenticate(&frames(b"key-of-hv-3", "hv-3"), no_derivation)
            .is_err());
    }
}
