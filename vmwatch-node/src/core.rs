//! The node's core: every decision of the agent, with no I/O (quinn-proto's `Connection` is
//! the model).
//!
//! The shell (`agent.rs`) owns libvirt, the ZeroMQ socket, the clock and systemd, and drives
//! the core in this order on every turn:
//!
//! 1. [`NodeCore::handle`] for each [`Input`] that arrived (facts from libvirt, results of the
//!    actions it performed, `Stop`);
//! 2. [`NodeCore::handle_timeout`] once the instant of [`NodeCore::poll_timeout`] has passed;
//! 3. [`NodeCore::poll_action`] until `None`, performing each [`Action`] and feeding its result
//!    back as an `Input`;
//! 4. [`NodeCore::poll_transmit`] until `None` or the socket is full, reporting each attempt
//!    through [`NodeCore::transmitted`];
//! 5. wait for the next input, at most until [`NodeCore::poll_timeout`].
//!
//! Time is an argument ([`Now`]): tests drive the core through reconnects, a full socket and
//! shutdown with simulated time.
//!
//! The core keeps the outgoing queue beyond libzmq's own (`send_queue`, SNDHWM): when the
//! socket is full, messages wait here; a new snapshot replaces any older queued snapshot and the
//! oldest other messages are dropped (and counted) past [`QUEUE_LIMIT`], so the latest snapshot
//! is never the one lost.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vmwatch_common::config::Secret;
use vmwatch_common::protocol::{AgentCounters, NodeId};

use crate::builder::{self, Class, MessageBuilder, Outgoing};
use crate::facts::{self, DomainCounters, DomainFacts, EventFacts};

/// Messages held by the core (beyond libzmq's SNDHWM) before the oldest are dropped.
pub const QUEUE_LIMIT: usize = 1024;
/// How soon the shell retries a full socket.
pub const RETRY_FULL: Duration = Duration::from_millis(20);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The two clocks the core needs: monotonic for timers, wall for message timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub unix_ms: u64,
}

impl Now {
    /// `self` moved on by `d` on both clocks (for simulated time).
    pub fn after(self, d: Duration) -> Now {
        Now {
            mono: self.mono + d,
            unix_ms: self.unix_ms + d.as_millis() as u64,
        }
    }
}

/// The core's settings (from `NodeConfig`).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub node_id: NodeId,
    pub secret: Secret,
    pub stats_interval: Duration,
    pub snapshot_interval: Duration,
    pub heartbeat_interval: Duration,
}

/// What the shell tells the core.
#[derive(Debug)]
pub enum Input {
    /// [`Action::Connect`] succeeded: connection `generation` is open and watched.
    Connected {
        generation: u64,
        libvirt_version: String,
    },
    /// [`Action::Connect`] failed.
    ConnectFailed { error: String },
    /// [`Action::ListDomains`] returned the inventory.
    Listed(Vec<DomainFacts>),
    /// [`Action::ListDomains`] failed; `alive` says whether the connection still is.
    ListFailed { error: String, alive: bool },
    /// A lifecycle or reboot event, turned into facts by the adapter.
    Event(EventFacts),
    /// Connection `generation` closed (`reason`: `virConnectCloseReason`).
    Closed { generation: u64, reason: i32 },
    /// One stats collection.
    Counters(Vec<DomainCounters>),
    /// A connection to the master completed its handshake: a fresh snapshot goes at once, so
    /// the master holds the whole inventory within a round trip even if what was queued before
    /// was lost (a handshake the master refused drops the queue; a new master knows nothing).
    MasterConnected,
    /// Shut down: say `bye`, release libvirt, then drain.
    Stop,
}

/// What the core asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open libvirt (with keepalive), register the callbacks tagged `generation`, then report
    /// [`Input::Connected`] or [`Input::ConnectFailed`].
    Connect { generation: u64 },
    /// List every domain, then report [`Input::Listed`] or [`Input::ListFailed`].
    ListDomains,
    /// Release the libvirt connection (it is dead, or the node stops).
    Release,
    /// Tell systemd.
    Notify(Notify),
}

/// The systemd notifications the core decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// Running and reporting (even if what it reports is that libvirt is down).
    Ready,
    Stopping,
}

/// What became of the message [`NodeCore::poll_transmit`] offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    Sent,
    /// The socket is full (libzmq's queue is at SNDHWM): keep it and retry.
    Full,
    /// The socket refused it for good; it is dropped.
    Failed(String),
}

/// A retry delay that doubles from `min` to `max` (libvirt reconnects here; the master's
/// socket redials in `socket.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// libvirt's: 0.5 s doubling to 30 s.
    fn new() -> Backoff {
        Backoff::between(BACKOFF_MIN, BACKOFF_MAX)
    }

    pub fn between(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Whether the delays have grown past the first.
    pub fn grown(&self) -> bool {
        self.next > self.min
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Libvirt {
    /// Not connected; the next attempt is due at this instant.
    Down { retry_at: Instant },
    /// [`Action::Connect`] for the current generation was handed out; its answer is awaited.
    Connecting,
    /// The current generation's connection is open.
    Up {
        /// When the next snapshot is due; `None` while a listing is out.
        snapshot_at: Option<Instant>,
        /// The connection is new: the listing's answer also sends the heartbeat that says
        /// libvirt is back (one before it would still say "down").
        announce: bool,
    },
}

/// The agent's state and decisions. See the module documentation for the calling order.
pub struct NodeCore {
    config: CoreConfig,
    builder: MessageBuilder,
    hostname: String,
    libvirt_version: String,
    libvirt: Libvirt,
    /// Of the last [`Action::Connect`]: only its answers and its close reports count.
    generation: u64,
    backoff: Backoff,
    ever_connected: bool,
    heartbeat_at: Instant,
    started: Instant,
    ready_sent: bool,
    stopping: bool,
    actions: VecDeque<Action>,
    queue: VecDeque<Outgoing>,
    socket_full: bool,
    domains: u64,
    /// `sent`, `events`, `dropped`, `libvirt_reconnects`; `overflow` is read off the queue.
    counters: AgentCounters,
}

impl NodeCore {
    /// A core for boot `boot` (a fresh id per process) on host `hostname`, started at `now`.
    pub fn new(config: CoreConfig, boot: String, hostname: String, now: Now) -> NodeCore {
        let builder = MessageBuilder::new(
            config.node_id.clone(),
            config.secret.clone(),
            boot,
            now.unix_ms,
        );
        NodeCore {
            config,
            builder,
            hostname,
            libvirt_version: String::new(),
            libvirt: Libvirt::Down { retry_at: now.mono },
            generation: 0,
            backoff: Backoff::new(),
            ever_connected: false,
            heartbeat_at: now.mono,
            started: now.mono,
            ready_sent: false,
            stopping: false,
            actions: VecDeque::new(),
            queue: VecDeque::new(),
            socket_full: false,
            domains: 0,
            counters: AgentCounters::default(),
        }
    }

    /// Takes one input.
    pub fn handle(&mut self, now: Now, input: Input) {
        if self.stopping {
            return;
        }
        match input {
            Input::Connected {
                generation,
                libvirt_version,
            } => self.connected(generation, libvirt_version),
            Input::ConnectFailed { error } => self.connect_failed(now, &error),
            Input::Listed(domains) => {
                let Libvirt::Up { announce, .. } = self.libvirt else {
                    return;
                };
                self.domains = domains.len() as u64;
                let body = builder::snapshot(&domains, &self.hostname, &self.libvirt_version);
                self.enqueue(now, body);
                self.listed(now, announce);
                self.notify_ready();
            }
            Input::ListFailed { error, alive } => {
                let Libvirt::Up { announce, .. } = self.libvirt else {
                    return;
                };
                if alive {
                    tracing::warn!(error = %error, "snapshot failed; retrying next interval");
                    self.listed(now, announce);
                } else {
                    self.lost(now, &format!("listing domains failed: {error}"));
                }
            }
            Input::Event(facts) => self.event(now, &facts),
            Input::MasterConnected => {
                if let Libvirt::Up {
                    snapshot_at: Some(at),
                    ..
                } = &mut self.libvirt
                {
                    *at = now.mono;
                }
            }
            Input::Closed { generation, reason } => {
                // A close report from an older connection changes nothing.
                if generation == self.generation && matches!(self.libvirt, Libvirt::Up { .. }) {
                    let why = facts::close_reason(reason);
                    self.lost(now, &format!("connection closed ({why})"));
                }
            }
            Input::Counters(counters) => {
                let interval = self.config.stats_interval.as_secs();
                for body in builder::stats(&counters, interval) {
                    self.enqueue(now, body);
                }
            }
            Input::Stop => self.stop(now),
        }
    }

    fn connected(&mut self, generation: u64, libvirt_version: String) {
        if self.libvirt != Libvirt::Connecting || generation != self.generation {
            return;
        }
        if self.ever_connected {
            self.counters.libvirt_reconnects += 1;
        }
        self.ever_connected = true;
        self.backoff.reset();
        self.libvirt_version = libvirt_version;
        // Events during an outage are gone: a fresh snapshot repairs the master's view.
        self.list_domains(true);
    }

    fn connect_failed(&mut self, now: Now, error: &str) {
        let delay = self.backoff.next_delay();
        tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "libvirt unavailable");
        self.libvirt = Libvirt::Down {
            retry_at: now.mono + delay,
        };
        if !self.ready_sent {
            self.heartbeat(now);
            self.notify_ready();
        }
    }

    fn event(&mut self, now: Now, facts: &EventFacts) {
        if facts.transient_domain_stopped() {
            if let Libvirt::Up {
                snapshot_at: Some(at),
                ..
            } = &mut self.libvirt
            {
                *at = now.mono;
            }
        }
        self.counters.events += 1;
        tracing::debug!(uuid = %facts.uuid, name = %facts.name, "event");
        self.enqueue(now, builder::event(facts));
    }

    fn stop(&mut self, now: Now) {
        tracing::info!("stopping: sending bye");
        self.actions.push_back(Action::Notify(Notify::Stopping));
        if !matches!(self.libvirt, Libvirt::Down { .. }) {
            self.actions.push_back(Action::Release);
        }
        self.enqueue(now, builder::bye("shutdown"));
        self.stopping = true;
    }

    /// Fires every timer due at `now`: connecting, the periodic snapshot, the heartbeat.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.stopping {
            return;
        }
        match self.libvirt {
            Libvirt::Down { retry_at } if now.mono >= retry_at => {
                self.generation += 1;
                self.libvirt = Libvirt::Connecting;
                self.actions.push_back(Action::Connect {
                    generation: self.generation,
                });
            }
            Libvirt::Up {
                snapshot_at: Some(at),
                ..
            } if now.mono >= at => self.list_domains(false),
            _ => {}
        }
        if self.heartbeat_due(now.mono) {
            self.heartbeat(now);
        }
    }

    /// The next instant [`NodeCore::handle_timeout`] has something to do (`None` once
    /// stopping, or while only an action's answer can move things on). A full socket is
    /// retried after [`RETRY_FULL`] besides: see [`NodeCore::wants_retry`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stopping {
            return None;
        }
        let libvirt = match self.libvirt {
            Libvirt::Down { retry_at } => Some(retry_at),
            Libvirt::Up { snapshot_at, .. } => snapshot_at,
            Libvirt::Connecting => None,
        };
        let heartbeat = (!self.settling()).then_some(self.heartbeat_at);
        match (libvirt, heartbeat) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether the shell should retry the socket soon (it was full with messages waiting).
    pub fn wants_retry(&self) -> bool {
        self.socket_full && !self.queue.is_empty()
    }

    /// The next thing for the shell to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The message to send next, if any. Report the attempt through
    /// [`NodeCore::transmitted`].
    pub fn poll_transmit(&self) -> Option<&Outgoing> {
        self.queue.front()
    }

    /// What became of the message [`NodeCore::poll_transmit`] offered last.
    pub fn transmitted(&mut self, result: Transmit) {
        match result {
            Transmit::Sent => {
                self.socket_full = false;
                if self.queue.pop_front().is_some() {
                    self.counters.sent += 1;
                }
            }
            Transmit::Full => self.socket_full = true,
            Transmit::Failed(error) => {
                if let Some(m) = self.queue.pop_front() {
                    tracing::warn!(error = %error, kind = m.kind, "zmq send failed; message dropped");
                    self.counters.dropped += 1;
                }
            }
        }
    }

    /// Messages waiting for the socket.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True once `Stop` was handled and everything queued went out.
    pub fn is_drained(&self) -> bool {
        self.stopping && self.queue.is_empty()
    }

    /// The agent's counters, as a heartbeat built now would report them. `overflow` counts
    /// the messages held beyond libzmq's queue: only while the socket is full (otherwise the
    /// queue empties within the turn).
    pub fn counters(&self) -> AgentCounters {
        AgentCounters {
            overflow: if self.socket_full {
                self.queue.len() as u64
            } else {
                0
            },
            ..self.counters
        }
    }

    /// While a connection attempt or the listing after it is under way, its answer sends the
    /// heartbeat: one now would say "down" a moment before libvirt is up.
    fn settling(&self) -> bool {
        matches!(
            self.libvirt,
            Libvirt::Connecting | Libvirt::Up { announce: true, .. }
        )
    }

    fn heartbeat_due(&self, now: Instant) -> bool {
        now >= self.heartbeat_at && !self.settling()
    }

    fn list_domains(&mut self, announce: bool) {
        self.libvirt = Libvirt::Up {
            snapshot_at: None,
            announce,
        };
        self.actions.push_back(Action::ListDomains);
    }

    /// The listing answered: the next one is due an interval from now.
    fn listed(&mut self, now: Now, announce: bool) {
        self.libvirt = Libvirt::Up {
            snapshot_at: Some(now.mono + self.config.snapshot_interval),
            announce: false,
        };
        if announce {
            self.heartbeat(now);
        }
    }

    fn lost(&mut self, now: Now, why: &str) {
        tracing::warn!(reason = why, "libvirt connection lost");
        self.actions.push_back(Action::Release);
        self.libvirt = Libvirt::Down {
            retry_at: now.mono + self.backoff.next_delay(),
        };
        self.heartbeat(now);
    }

    fn heartbeat(&mut self, now: Now) {
        let up = matches!(self.libvirt, Libvirt::Up { .. });
        let uptime = now.mono.saturating_duration_since(self.started).as_secs();
        let body = builder::heartbeat(up, self.domains, uptime, self.counters());
        self.enqueue(now, body);
        self.heartbeat_at = now.mono + self.config.heartbeat_interval;
    }

    fn notify_ready(&mut self) {
        if !self.ready_sent {
            self.ready_sent = true;
            self.actions.push_back(Action::Notify(Notify::Ready));
        }
    }

    fn enqueue(&mut self, now: Now, body: vmwatch_common::protocol::Body) {
        let m = self.builder.build(now.unix_ms, body);
        tracing::debug!(kind = m.kind, seq = m.seq, "queued");
        self.counters.dropped += push_bounded(&mut self.queue, m);
    }
}

/// Adds `m` to the queue, keeping only the newest snapshot and dropping oldest-first past
/// [`QUEUE_LIMIT`]. Returns how many messages were dropped.
fn push_bounded(queue: &mut VecDeque<Outgoing>, m: Outgoing) -> u64 {
    let before = queue.len();
    if m.class == Class::Snapshot {
        queue.retain(|o| o.class != Class::Snapshot);
    }
    let mut dropped = (before - queue.len()) as u64;
    queue.push_back(m);
    // At most one over: the queue never exceeds the limit before this push.
    if queue.len() > QUEUE_LIMIT {
        let victim = queue
            .iter()
            .position(|o| o.class != Class::Snapshot)
            .unwrap_or(0);
        queue.remove(victim);
        dropped += 1;
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmwatch_common::protocol::{authenticate, Body};

    const SECRET: &str = "0123456789abcdef";

    fn start() -> (NodeCore, Now) {
        let now = Now {
            mono: Instant::now(),
            unix_ms: 1_700_000_000_000,
        };
        let config = CoreConfig {
            node_id: NodeId::parse("hv1").unwrap(),
            secret: Secret::new(SECRET.into()).unwrap(),
            stats_interval: Duration::from_secs(600),
            snapshot_interval: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(30),
        };
        (
            NodeCore::new(config, "boot-1".into(), "host".into(), now),
            now,
        )
    }

    fn actions(core: &mut NodeCore) -> Vec<Action> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    /// Sends everything queued and returns the bodies, checking each frame authenticates.
    fn sent(core: &mut NodeCore) -> Vec<Body> {
        let mut out = Vec::new();
        while let Some(m) = core.poll_transmit() {
            let a = authenticate(&m.frames, |_| Some(SECRET.as_bytes())).unwrap();
            out.push(a.payload().body.clone());
            core.transmitted(Transmit::Sent);
        }
        out
    }

    fn heartbeat_of(body: &Body) -> (&str, u64, AgentCounters) {
        match body {
            Body::Heartbeat(h) => (h.libvirt.as_str(), h.domains, h.agent),
            other => panic!("not a heartbeat: {}", other.kind()),
        }
    }

    fn domain(uuid: &str, state: i32) -> DomainFacts {
        DomainFacts {
            uuid: uuid.into(),
            name: uuid.into(),
            state,
            reason: 1,
        }
    }

    /// Connects generation `g` at `now` and answers the listing with `n` domains.
    fn connect(core: &mut NodeCore, now: Now, g: u64, n: usize) {
        core.handle_timeout(now);
        assert_eq!(actions(core), [Action::Connect { generation: g }]);
        core.handle(
            now,
            Input::Connected {
                generation: g,
                libvirt_version: "9.0.0".into(),
            },
        );
        assert_eq!(actions(core), [Action::ListDomains]);
        let domains = (0..n).map(|i| domain(&format!("u{i}"), 1)).collect();
        core.handle(now, Input::Listed(domains));
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn libvirt_down_at_start_is_reported_and_retried_with_backoff() {
        let (mut core, t0) = start();
        core.handle_timeout(t0);
        assert_eq!(actions(&mut core), [Action::Connect { generation: 1 }]);
        core.handle(
            t0,
            Input::ConnectFailed {
                error: "no socket".into(),
            },
        );
        // Ready means "running and reporting", even when what it reports is that libvirt is
        // down; the heartbeat says so.
        assert_eq!(actions(&mut core), [Action::Notify(Notify::Ready)]);
        let bodies = sent(&mut core);
        assert_eq!(heartbeat_of(&bodies[0]).0, "down");
        let mut at = t0;
        for (attempt, delay_ms) in [(2, 500), (3, 1000), (4, 2000)] {
            assert_eq!(
                core.poll_timeout(),
                Some(at.mono + Duration::from_millis(delay_ms))
            );
            // Nothing happens before the timer.
            core.handle_timeout(at.after(Duration::from_millis(delay_ms - 1)));
            assert_eq!(actions(&mut core), []);
            at = at.after(Duration::from_millis(delay_ms));
            core.handle_timeout(at);
            assert_eq!(
                actions(&mut core),
                [Action::Connect {
                    generation: attempt
                }]
            );
            core.handle(at, Input::ConnectFailed { error: "x".into() });
            assert_eq!(actions(&mut core), [], "Ready is said once");
        }
        connect(&mut core, at.after(Duration::from_secs(4)), 5, 2);
        let bodies = sent(&mut core);
        let kinds: Vec<&str> = bodies.iter().map(Body::kind).collect();
        assert_eq!(kinds, ["snapshot", "heartbeat"]);
        let (libvirt, domains, agent) = heartbeat_of(&bodies[1]);
        assert_eq!((libvirt, domains, agent.libvirt_reconnects), ("up", 2, 0));
    }

    /// A completed connection to the master brings a fresh snapshot at once, not after
    /// `snapshot_interval`.
    #[test]
    fn a_new_master_connection_gets_a_snapshot_at_once() {
        let (mut core, t0) = start();
        connect(&mut core, t0, 1, 2);
        actions(&mut core);
        sent(&mut core);
        let t1 = t0.after(Duration::from_secs(5));
        core.handle_timeout(t1);
        assert_eq!(actions(&mut core), [], "no snapshot before the interval");
        core.handle(t1, Input::MasterConnected);
        core.handle_timeout(t1);
        assert_eq!(actions(&mut core), [Action::ListDomains]);
    }

    #[test]
    fn a_lost_connection_is_said_at_once_and_reconnected() {
        let (mut core, t0) = start();
        connect(&mut core, t0, 1, 1);
        assert_eq!(actions(&mut core), [Action::Notify(Notify::Ready)]);
        sent(&mut core);
        let t1 = t0.after(Duration::from_secs(7));
        // A close report of an older connection changes nothing.
        core.handle(
            t1,
            Input::Closed {
                generation: 0,
                reason: 1,
            },
        );
        assert_eq!((actions(&mut core), sent(&mut core).len()), (vec![], 0));
        core.handle(
            t1,
            Input::Closed {
                generation: 1,
                reason: 1,
            },
        );
        assert_eq!(actions(&mut core), [Action::Release]);
        let bodies = sent(&mut core);
        assert_eq!(heartbeat_of(&bodies[0]).0, "down");
        assert_eq!(
            core.poll_timeout(),
            Some(t1.mono + Duration::from_millis(500))
        );
        connect(&mut core, t1.after(Duration::from_millis(500)), 2, 1);
        let bodies = sent(&mut core);
        assert_eq!(bodies[0].kind(), "snapshot");
        let (libvirt, _, agent) = heartbeat_of(&bodies[1]);
        assert_eq!((libvirt, agent.libvirt_reconnects), ("up", 1));
        // A listing that fails on a dead connection is a loss too; on a live one it is not.
        let t2 = t1.after(Duration::from_secs(61));
        core.handle_timeout(t2);
        assert_eq!(actions(&mut core), [Action::ListDomains]);
        core.handle(
            t2,
            Input::ListFailed {
                error: "busy".into(),
                alive: true,
            },
        );
        assert_eq!(actions(&mut core), []);
        assert_eq!(
            core.poll_timeout(),
            Some(
                (t2.after(Duration::from_secs(60)))
                    .mono
                    .min(core.heartbeat_at)
            )
        );
        let t3 = t2.after(Duration::from_secs(60));
        core.handle_timeout(t3);
        sent(&mut core);
        assert_eq!(actions(&mut core), [Action::ListDomains]);
        core.handle(
            t3,
            Input::ListFailed {
                error: "eof".into(),
                alive: false,
            },
        );
        assert_eq!(actions(&mut core), [Action::Release]);
        assert_eq!(heartbeat_of(&sent(&mut core)[0]).0, "down");
    }

    #[test]
    fn a_connection_lost_before_its_first_listing_answers_keeps_the_heartbeats_going() {
        let (mut core, t0) = start();
        core.handle_timeout(t0);
        assert_eq!(actions(&mut core), [Action::Connect { generation: 1 }]);
        core.handle(
            t0,
            Input::Connected {
                generation: 1,
                libvirt_version: "9.0.0".into(),
            },
        );
        assert_eq!(actions(&mut core), [Action::ListDomains]);
        core.handle(
            t0,
            Input::Closed {
                generation: 1,
                reason: 1,
            },
        );
        assert_eq!(actions(&mut core), [Action::Release]);
        assert_eq!(heartbeat_of(&sent(&mut core)[0]).0, "down");
        // The listing's late answer changes nothing; the timers are ahead, not in the past.
        core.handle(t0, Input::Listed(vec![domain("u1", 1)]));
        assert_eq!(sent(&mut core).len(), 0);
        assert_eq!(
            core.poll_timeout(),
            Some(t0.mono + Duration::from_millis(500))
        );
        let t1 = t0.after(Duration::from_millis(500));
        core.handle_timeout(t1);
        assert_eq!(actions(&mut core), [Action::Connect { generation: 2 }]);
        core.handle(t1, Input::ConnectFailed { error: "x".into() });
        // Half a minute later the outage is still reported.
        let t2 = t0.after(Duration::from_secs(30));
        core.handle_timeout(t2);
        let bodies = sent(&mut core);
        assert_eq!(bodies.len(), 1);
        assert_eq!(heartbeat_of(&bodies[0]).0, "down");
    }

    #[test]
    fn a_stopped_transient_domain_brings_the_snapshot_forward() {
        let (mut core, t0) = start();
        connect(&mut core, t0, 1, 1);
        actions(&mut core);
        sent(&mut core);
        let t1 = t0.after(Duration::from_secs(3));
        let event = |persistent, current| EventFacts {
            uuid: "u0".into(),
            name: "u0".into(),
            event: 5,
            detail: 3,
            reboot: false,
            event_ts: 1,
            current,
            persistent,
        };
        core.handle(t1, Input::Event(event(true, Some((5, 4)))));
        assert!(core.poll_timeout() > Some(t1.mono));
        core.handle(t1, Input::Event(event(false, None)));
        assert_eq!(core.poll_timeout(), Some(t1.mono));
        core.handle_timeout(t1);
        assert_eq!(actions(&mut core), [Action::ListDomains]);
        let kinds: Vec<&str> = sent(&mut core).iter().map(Body::kind).collect();
        assert_eq!(kinds, ["event", "event"]);
        assert_eq!(core.counters().events, 2);
    }

    #[test]
    fn a_full_socket_keeps_the_newest_snapshot_and_drops_the_oldest_events() {
        let (mut core, t0) = start();
        connect(&mut core, t0, 1, 1);
        actions(&mut core);
        core.transmitted(Transmit::Full);
        assert!(core.wants_retry());
        for i in 0..QUEUE_LIMIT as u64 + 10 {
            let e = EventFacts {
                uuid: format!("u{i}"),
                name: "n".into(),
                event: 2,
                detail: 0,
                reboot: false,
                event_ts: i,
                current: Some((1, 1)),
                persistent: true,
            };
            core.handle(t0, Input::Event(e));
        }
        assert_eq!(core.queued(), QUEUE_LIMIT);
        // The first snapshot was kept while the heartbeat and the oldest events went.
        assert_eq!(core.poll_transmit().map(|m| m.kind), Some("snapshot"));
        assert_eq!(core.counters().dropped, 12);
        // A new snapshot replaces the queued one.
        core.handle_timeout(t0.after(Duration::from_secs(60)));
        assert_eq!(actions(&mut core), [Action::ListDomains]);
        core.handle(
            t0.after(Duration::from_secs(60)),
            Input::Listed(vec![domain("a", 1), domain("b", 3)]),
        );
        let bodies = sent(&mut core);
        let snapshots: Vec<usize> = bodies
            .iter()
            .filter_map(|b| match b {
                Body::Snapshot(s) => Some(s.domains.len()),
                _ => None,
            })
            .collect();
        assert_eq!(snapshots, [2]);
        let last_heartbeat = bodies.iter().rfind(|b| b.kind() == "heartbeat");
        let (_, _, agent) = heartbeat_of(last_heartbeat.unwrap());
        assert_eq!(
            (agent.dropped, agent.overflow),
            (12, QUEUE_LIMIT as u64),
            "the heartbeat built while the socket was full counts what waited"
        );
        // Making room for that heartbeat dropped one more event; the new snapshot replaced the
        // old one.
        assert_eq!(core.counters().dropped, 14);
        assert!(!core.wants_retry());
    }

    #[test]
    fn stop_says_bye_last_releases_libvirt_and_then_does_nothing() {
        let (mut core, t0) = start();
        connect(&mut core, t0, 1, 1);
        actions(&mut core);
        core.handle(t0, Input::Stop);
        assert_eq!(
            actions(&mut core),
            [Action::Notify(Notify::Stopping), Action::Release]
        );
        assert!(!core.is_drained());
        core.handle(
            t0,
            Input::Event(EventFacts {
                uuid: "late".into(),
                name: "n".into(),
                event: 2,
                detail: 0,
                reboot: false,
                event_ts: 1,
                current: None,
                persistent: true,
            }),
        );
        core.handle_timeout(t0.after(Duration::from_secs(3600)));
        assert_eq!((actions(&mut core), core.poll_timeout()), (vec![], None));
        let kinds: Vec<&str> = sent(&mut core).iter().map(Body::kind).collect();
        assert_eq!(kinds, ["snapshot", "heartbeat", "bye"]);
        assert!(core.is_drained());
    }
}
