//! The agent's main loop: libvirt signals and timers in, messages out.
//!
//! One thread owns the libvirt connection and the [`MessageBuilder`]; the libvirt event thread
//! only forwards callbacks to it through a channel. Order of work at start: connect (with
//! keepalive), register callbacks, send a snapshot. When libvirt is lost (close callback or a
//! failed call) the agent says so at once in a heartbeat, reconnects with backoff (0.5 s
//! doubling to 30 s), registers again and sends a fresh snapshot.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender as ChannelSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virt::connect::Connect;
use vmwatch_common::protocol::AgentCounters;
use vmwatch_common::time::now_ms;

use crate::builder::{self, EventFacts, MessageBuilder};
use crate::config::NodeConfig;
use crate::libvirt::{self, Signal, Watch};
use crate::sender::Sender;

const KEEPALIVE_INTERVAL_S: i32 = 5;
const KEEPALIVE_COUNT: u32 = 3;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest the loop sleeps, so that flags (SIGTERM, SIGHUP) are seen promptly.
const TICK: Duration = Duration::from_millis(100);

/// Process-wide flags set by signal handlers.
#[derive(Default, Clone)]
pub struct Flags {
    pub terminate: Arc<AtomicBool>,
    pub reopen_log: Arc<AtomicBool>,
}

/// Backoff for reconnecting: 0.5 s doubling to 30 s, reset on success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff(BACKOFF_MIN)
    }
    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

struct Connection {
    conn: Connect,
    // Field order matters: callbacks are deregistered before the connection is released.
    _watch: Watch,
}

pub struct Agent {
    config: NodeConfig,
    builder: MessageBuilder,
    sender: Sender,
    signals_tx: ChannelSender<Signal>,
    signals: Receiver<Signal>,
    connection: Option<Connection>,
    backoff: Backoff,
    next_connect: Instant,
    next_snapshot: Instant,
    next_heartbeat: Instant,
    domains: u64,
    /// Lifecycle events sent, and successful reconnections after a loss (for heartbeats).
    events_sent: u64,
    reconnects: u64,
    ever_connected: bool,
    started: Instant,
    ready_sent: bool,
    watchdog: Option<Duration>,
    last_watchdog: Instant,
    hostname: String,
    /// Called after each SIGHUP to reopen the log file.
    reopen_log: Box<dyn Fn()>,
}

impl Agent {
    pub fn new(config: NodeConfig, sender: Sender, reopen_log: Box<dyn Fn()>) -> Agent {
        let boot = uuid::Uuid::new_v4().to_string();
        let builder = MessageBuilder::new(
            config.node_id.clone(),
            config.secret.clone(),
            boot,
            now_ms(),
        );
        let (signals_tx, signals) = std::sync::mpsc::channel();
        let now = Instant::now();
        let mut usec = 0u64;
        let watchdog =
            sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2));
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into());
        Agent {
            config,
            builder,
            sender,
            signals_tx,
            signals,
            connection: None,
            backoff: Backoff::new(),
            next_connect: now,
            next_snapshot: now,
            next_heartbeat: now,
            domains: 0,
            events_sent: 0,
            reconnects: 0,
            ever_connected: false,
            started: now,
            ready_sent: false,
            watchdog,
            last_watchdog: now,
            hostname,
            reopen_log,
        }
    }

    /// Runs until `flags.terminate`; then sends `bye` and drains with a bounded linger.
    pub fn run(mut self, flags: &Flags) {
        let stats_thread = spawn_stats_collector(
            self.config.libvirt_uri.clone(),
            Duration::from_secs(self.config.stats_interval),
            self.signals_tx.clone(),
            flags.terminate.clone(),
        );
        tracing::info!(
            node_id = %self.config.node_id,
            connect = %self.config.connect,
            libvirt_uri = %self.config.libvirt_uri,
            version = vmwatch_common::VERSION,
            "vmwatch-node started"
        );
        while !flags.terminate.load(Ordering::Relaxed) {
            if flags.reopen_log.swap(false, Ordering::Relaxed) {
                (self.reopen_log)();
                tracing::info!("log file reopened (SIGHUP)");
            }
            let now = Instant::now();
            let mut next = now + TICK;
            for t in [
                self.next_heartbeat,
                if self.connection.is_some() {
                    self.next_snapshot
                } else {
                    self.next_connect
                },
            ] {
                next = next.min(t);
            }
            match self
                .signals
                .recv_timeout(next.saturating_duration_since(now))
            {
                Ok(signal) => self.on_signal(signal),
                Err(RecvTimeoutError::Timeout) => {}
                // The agent holds a sender itself, so the channel never disconnects.
                Err(RecvTimeoutError::Disconnected) => {}
            }
            self.on_timers();
        }
        tracing::info!("stopping: sending bye");
        if let Ok(t) = stats_thread {
            let _ = t.join();
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        let bye = self.builder.build(now_ms(), builder::bye("shutdown"));
        self.sender.send(bye);
        release(self.connection.take());
        let counters = self.sender.counters.clone();
        self.sender.drain(Duration::from_secs(5));
        tracing::info!(
            sent = counters.sent.load(Ordering::Relaxed),
            dropped = counters.dropped.load(Ordering::Relaxed),
            "vmwatch-node stopped"
        );
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            Signal::Event {
                domain,
                event,
                detail,
                reboot,
                event_ts,
            } => {
                let (uuid, name) = match libvirt::domain_identity(&domain) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(error = %e, "event for a domain without identity; ignored");
                        return;
                    }
                };
                // Events are hints: the state read now is the truth we report.
                let current = libvirt::domain_state(&domain).ok();
                // A transient domain that stopped (e.g. the source of a live migration) is
                // gone, or about to be: no event says so, a snapshot (which leaves inactive
                // transient domains out) does.
                let stopped = matches!(current, None | Some((5, _))); // 5: VIR_DOMAIN_SHUTOFF
                if stopped && !libvirt::is_persistent(&domain) {
                    self.next_snapshot = Instant::now();
                }
                let facts = EventFacts {
                    uuid,
                    name,
                    event,
                    detail,
                    reboot,
                    event_ts,
                    current,
                };
                let body = builder::event(&facts);
                let m = self.builder.build(now_ms(), body);
                self.events_sent += 1;
                tracing::debug!(uuid = %facts.uuid, name = %facts.name, seq = m.seq, "event sent");
                self.sender.send(m);
            }
            Signal::Counters(counters) => {
                let interval = self.config.stats_interval;
                for body in builder::stats(&counters, interval) {
                    let m = self.builder.build(now_ms(), body);
                    tracing::debug!(domains = counters.len(), seq = m.seq, "stats sent");
                    self.sender.send(m);
                }
            }
            Signal::Closed { reason } => {
                let Some(c) = &self.connection else { return };
                // A close report may come from an older connection: only a dead one counts.
                if libvirt::is_alive(&c.conn) {
                    return;
                }
                let why = match reason {
                    0 => "error",
                    1 => "end of file",
                    2 => "keepalive timeout",
                    3 => "closed by client",
                    _ => "unknown reason",
                };
                self.lost(&format!("connection closed ({why})"));
            }
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        if self.connection.is_none() && now >= self.next_connect {
            self.connect();
        }
        if self.connection.is_some() && Instant::now() >= self.next_snapshot {
            self.send_snapshot();
        }
        if Instant::now() >= self.next_heartbeat {
            self.send_heartbeat();
        }
        if let Some(every) = self.watchdog {
            if self.last_watchdog.elapsed() >= every {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                self.last_watchdog = Instant::now();
            }
        }
    }

    fn connect(&mut self) {
        let opened = libvirt::open(
            &self.config.libvirt_uri,
            KEEPALIVE_INTERVAL_S,
            KEEPALIVE_COUNT,
        )
        .and_then(|conn| Watch::register(&conn, &self.signals_tx).map(|w| (conn, w)));
        match opened {
            Ok((conn, watch)) => {
                tracing::info!(uri = %self.config.libvirt_uri, version = %libvirt::libvirt_version(&conn), "connected to libvirt");
                self.connection = Some(Connection {
                    conn,
                    _watch: watch,
                });
                if self.ever_connected {
                    self.reconnects += 1;
                }
                self.ever_connected = true;
                self.backoff = Backoff::new();
                // Events during an outage are gone: a fresh snapshot repairs the master's view.
                self.send_snapshot();
                self.send_heartbeat();
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "libvirt unavailable");
                self.next_connect = Instant::now() + delay;
                if !self.ready_sent {
                    // Ready means "running and reporting", even if what it reports is that
                    // libvirt is down.
                    self.send_heartbeat();
                    self.notify_ready();
                }
            }
        }
    }

    fn lost(&mut self, why: &str) {
        tracing::warn!(reason = why, "libvirt connection lost");
        release(self.connection.take());
        self.send_heartbeat();
        self.next_connect = Instant::now() + self.backoff.next_delay();
    }

    fn send_snapshot(&mut self) {
        let Some(c) = &self.connection else { return };
        match libvirt::list_domains(&c.conn) {
            Ok(domains) => {
                self.domains = domains.len() as u64;
                let version = libvirt::libvirt_version(&c.conn);
                let body = builder::snapshot(&domains, &self.hostname, &version);
                let m = self.builder.build(now_ms(), body);
                tracing::debug!(domains = domains.len(), seq = m.seq, "snapshot sent");
                self.sender.send(m);
                self.next_snapshot =
                    Instant::now() + Duration::from_secs(self.config.snapshot_interval);
                self.notify_ready();
            }
            Err(e) => {
                if libvirt::is_alive(&c.conn) {
                    tracing::warn!(error = %e, "snapshot failed; retrying next interval");
                    self.next_snapshot =
                        Instant::now() + Duration::from_secs(self.config.snapshot_interval);
                } else {
                    self.lost(&format!("listing domains failed: {e}"));
                }
            }
        }
    }

    fn send_heartbeat(&mut self) {
        let up = self
            .connection
            .as_ref()
            .is_some_and(|c| libvirt::is_alive(&c.conn));
        let c = &self.sender.counters;
        let agent = AgentCounters {
            sent: c.sent.load(Ordering::Relaxed),
            events: self.events_sent,
            dropped: c.dropped.load(Ordering::Relaxed),
            overflow: c.overflow.load(Ordering::Relaxed),
            libvirt_reconnects: self.reconnects,
        };
        let body = builder::heartbeat(up, self.domains, self.started.elapsed().as_secs(), agent);
        let m = self.builder.build(now_ms(), body);
        self.sender.send(m);
        self.next_heartbeat = Instant::now() + Duration::from_secs(self.config.heartbeat_interval);
    }

    fn notify_ready(&mut self) {
        if !self.ready_sent {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
            self.ready_sent = true;
        }
    }
}

/// Collects counters on a connection and thread of its own, right after start and then every
/// `interval` (fixed rate), so a slow stats call never delays lifecycle events. Each collection
/// goes to the agent as one [`Signal::Counters`].
fn spawn_stats_collector(
    uri: String,
    interval: Duration,
    tx: ChannelSender<Signal>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stats".into())
        .spawn(move || {
            let mut conn: Option<Connect> = None;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(TICK.min(next.saturating_duration_since(Instant::now())));
                    continue;
                }
                if conn.is_none() {
                    match libvirt::open(&uri, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT) {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "stats: libvirt unavailable");
                            next = Instant::now() + interval.min(Duration::from_secs(5));
                            continue;
                        }
                    }
                }
                let Some(c) = &conn else { continue };
                let started = Instant::now();
                match libvirt::all_domain_counters(c) {
                    Ok(counters) => {
                        tracing::debug!(
                            domains = counters.len(),
                            took_ms = started.elapsed().as_millis() as u64,
                            "stats collected"
                        );
                        if tx.send(Signal::Counters(counters)).is_err() {
                            return;
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
                            release(conn.take());
                        }
                        next = Instant::now() + interval.min(Duration::from_secs(5));
                    }
                }
            }
            release(conn);
        })
}

/// Releases a libvirt connection (or a watch with its connection) whose daemon may be gone.
/// The `virt` crate panics in `Drop` if `virConnectClose` fails; a dead connection must not
/// take the agent down with it.
fn release<T>(c: Option<T>) {
    if let Some(c) = c {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c))).is_err() {
            tracing::warn!("releasing a dead libvirt connection failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }
}
