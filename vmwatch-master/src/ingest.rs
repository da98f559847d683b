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
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmwatch_common::daemon::Shutdown;
use vmwatch_common::keys;
use vmwatch_common::protocol::{authenticate, Authenticated, NodeId, Rejected};

use crate::config::MasterConfig;
use crate::metrics::{Metrics, RejectLog};

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

/// The bound node port and its helpers, all in one ZeroMQ context. Fields drop in order: the
/// sockets before the context (whose drop waits for every socket to close).
pub struct NodePort {
    pull: zmq::Socket,
    zap: zmq::Socket,
    monitor: zmq::Socket,
    // Held only to outlive the sockets.
    _ctx: zmq::Context,
    transport_public: [u8; 32],
    listen_port: u16,
    max_connections: usize,
}

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

/// Binds the ZAP handler, then the PULL socket (before anything else starts, so a busy port
/// fails at once).
pub fn bind(config: &MasterConfig, max_connections: usize) -> Result<NodePort, BindError> {
    let Some(secret) = config.secret.as_ref() else {
        return Err(BindError::NoSecret);
    };
    let server = keys::server_keypair(secret.expose());
    let transport = keys::transport_keypair(secret.expose());
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
        transport_public: transport.public,
        listen_port,
        max_connections,
    })
}

pub fn spawn(
    port: NodePort,
    config: Arc<MasterConfig>,
    to_core: SyncSender<Received>,
    metrics: Arc<Metrics>,
    reject_log: Arc<RejectLog>,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("zmq-pull".into())
        .spawn(move || {
            let _guard = shutdown.guard("the ingest thread");
            run(port, &config, to_core, &metrics, &reject_log, &shutdown)
        })
}

/// Keys of nodes that have authenticated once: deriving a node's key costs an HMAC per message
/// otherwise. A key enters only after it verified a message (a forged id never enters), and at
/// most `max` of them.
struct Keyring {
    keys: HashMap<NodeId, Vec<u8>>,
    max: usize,
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

struct Ingest<'a> {
    port: NodePort,
    config: &'a MasterConfig,
    to_core: SyncSender<Received>,
    metrics: &'a Metrics,
    reject_log: &'a RejectLog,
    shutdown: &'a Shutdown,
    connections: usize,
    keyring: Keyring,
    /// A message the core had no room for yet; while it waits, nothing more is read.
    pending: Option<Received>,
}

fn run(
    port: NodePort,
    config: &MasterConfig,
    to_core: SyncSender<Received>,
    metrics: &Metrics,
    reject_log: &RejectLog,
    shutdown: &Shutdown,
) {
    let mut ingest = Ingest {
        port,
        config,
        to_core,
        metrics,
        reject_log,
        shutdown,
        connections: 0,
        keyring: Keyring {
            keys: HashMap::new(),
            max: config.max_nodes,
        },
        pending: None,
    };
    while !shutdown.is_triggered() {
        if let Err(CoreGone) = ingest.turn() {
            return;
        }
    }
    if let Some(r) = ingest.pending {
        // Stopping: the core is still draining and takes this last one.
        let _ = ingest.to_core.send(r);
    }
}

impl Ingest<'_> {
    /// One poll: answers ZAP and the monitor, hands the held message on, then reads a burst.
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
        let timeout = if self.pending.is_some() { 20 } else { 200 };
        if let Err(e) = zmq::poll(&mut items, timeout) {
            tracing::error!(error = %e, "zmq poll failed");
            std::thread::sleep(Duration::from_millis(100));
            return Ok(());
        }
        let (zap_ready, monitor_ready) = (items[0].is_readable(), items[1].is_readable());
        if zap_ready {
            while answer_zap(&port.zap, &port.transport_public) {}
        }
        if monitor_ready {
            while let Some(event) = monitor_event(&port.monitor) {
                on_event(event, port, &mut self.connections, self.metrics);
            }
        }
        if let Some(r) = self.pending.take() {
            match self.to_core.try_send(r) {
                Ok(()) => {}
                Err(TrySendError::Full(r)) => {
                    self.pending = Some(r);
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(CoreGone),
            }
        }
        self.read_burst()
    }

    /// Reads what is ready, one message at a time, up to a turn's worth (so ZAP and the
    /// monitor are answered between bursts), until the core has no room.
    fn read_burst(&mut self) -> Result<(), CoreGone> {
        for n in 0..1024 {
            if n % 64 == 63 {
                // Handshakes are not kept waiting behind a burst of messages.
                while answer_zap(&self.port.zap, &self.port.transport_public) {}
                if self.shutdown.is_triggered() {
                    break;
                }
            }
            let frames = match receive(&self.port.pull) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "zmq receive failed");
                    break;
                }
            };
            let config = self.config;
            match self.keyring.authenticate(&frames, |n| config.key_for(n)) {
                Ok(message) => match self.to_core.try_send(Received {
                    message,
                    arrived: vmwatch_common::time::now_ms(),
                }) {
                    Ok(()) => {}
                    Err(TrySendError::Full(r)) => {
                        self.pending = Some(r);
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => return Err(CoreGone),
                },
                Err(r) => {
                    self.metrics.count_reject(r.reason);
                    self.reject_log.log(&r);
                }
            }
        }
        Ok(())
    }
}

/// Answers one ZAP request (RFC 27): 200 for the fleet transport key, 400 for anything else.
/// Returns whether there was one.
fn answer_zap(zap: &zmq::Socket, transport_public: &[u8; 32]) -> bool {
    let Ok(frames) = zap.recv_multipart(zmq::DONTWAIT) else {
        return false;
    };
    // version, request id, domain, address, routing id, mechanism, credentials…
    let request_id = frames.get(1).cloned().unwrap_or_default();
    let ok = frames.len() == 7
        && frames[0] == b"1.0"
        && frames[5] == b"CURVE"
        && frames[6].as_slice() == transport_public.as_slice();
    let (code, text): (&[u8], &[u8]) = if ok {
        (b"200", b"OK")
    } else {
        (b"400", b"unknown client key")
    };
    let reply: [&[u8]; 6] = [b"1.0", &request_id, code, text, b"", b""];
    if let Err(e) = zap.send_multipart(reply, zmq::DONTWAIT) {
        tracing::warn!(error = %e, "cannot answer a ZAP request");
    }
    true
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

fn on_event(
    (event, value): (u16, u32),
    port: &NodePort,
    connections: &mut usize,
    metrics: &Metrics,
) {
    let is = |e: zmq::SocketEvent| event == e as u16;
    if is(zmq::SocketEvent::ACCEPTED) {
        *connections += 1;
        if *connections > port.max_connections {
            refuse(value as RawFd, port.listen_port);
            metrics.zmq_connections_refused.inc();
        }
    } else if is(zmq::SocketEvent::DISCONNECTED) {
        *connections = connections.saturating_sub(1);
    } else {
        metrics.zmq_handshake_failures.inc();
    }
    metrics.zmq_connections.set(*connections as i64);
}

/// Shuts down an accepted connection beyond the cap; libzmq then sees it end and cleans up.
/// The descriptor comes from the monitor event and is checked to still be a socket on the node
/// port: a descriptor reused meanwhile by anything else is never touched. (One reused by
/// another node-port connection would be shut down instead; that node reconnects.)
fn refuse(fd: RawFd, listen_port: u16) {
    use nix::sys::socket::{getsockname, shutdown, Shutdown, SockaddrStorage};
    let on_node_port = getsockname::<SockaddrStorage>(fd).ok().and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| v4.port())
            .or_else(|| a.as_sockaddr_in6().map(|v6| v6.port()))
    }) == Some(listen_port);
    if on_node_port {
        let _ = shutdown(fd, Shutdown::Both);
    }
}

/// One whole multipart message, keeping at most five frames; `None` when nothing is ready.
fn receive(socket: &zmq::Socket) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
    let mut frames = Vec::with_capacity(4);
    let mut extra = 0usize;
    loop {
        let part = match socket.recv_bytes(if frames.is_empty() && extra == 0 {
            zmq::DONTWAIT
        } else {
            0
        }) {
            Ok(p) => p,
            Err(zmq::Error::EAGAIN) if frames.is_empty() && extra == 0 => return Ok(None),
            Err(e) => return Err(e),
        };
        if frames.len() < 5 {
            frames.push(part);
        } else {
            extra += 1;
        }
        if !socket.get_rcvmore()? {
            return Ok(Some(frames));
        }
    }
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
