//! The ZeroMQ PUSH socket, in a thread of its own, fed through a channel.
//!
//! libzmq queues up to `send_queue` (SNDHWM) messages while the master is unreachable and
//! reconnects by itself. Past that, messages wait in a small overflow of our own where a new
//! snapshot replaces any older snapshot and the oldest other messages are dropped (and counted)
//! first, so the latest snapshot is never the one lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::builder::{Class, Outgoing};

/// Messages held by us (beyond libzmq's SNDHWM) before the oldest are dropped.
const OVERFLOW_LIMIT: usize = 1024;

/// Counters the heartbeat and the log report.
#[derive(Debug, Default)]
pub struct SenderCounters {
    pub sent: AtomicU64,
    pub dropped: AtomicU64,
    pub overflow: AtomicU64,
}

enum Command {
    Send(Outgoing),
    Drain { linger: Duration },
}

pub struct Sender {
    tx: SyncSender<Command>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<SenderCounters>,
}

impl Sender {
    /// Creates the socket and connects it (libzmq connects in the background).
    pub fn start(
        endpoint: &str,
        send_queue: i32,
        curve: &crate::config::CurveClient,
    ) -> Result<Sender, String> {
        let ctx = zmq::Context::new();
        let socket = ctx
            .socket(zmq::PUSH)
            .map_err(|e| format!("zmq socket: {e}"))?;
        let setup = || -> Result<(), zmq::Error> {
            socket.set_curve_serverkey(&curve.master_public)?;
            socket.set_curve_publickey(&curve.transport.public)?;
            socket.set_curve_secretkey(&curve.transport.secret)?;
            socket.set_sndhwm(send_queue)?;
            socket.set_linger(0)?;
            socket.set_reconnect_ivl(100)?;
            socket.set_reconnect_ivl_max(5_000)?;
            socket.set_tcp_keepalive(1)?;
            // A master that vanished without a FIN is noticed within about a minute and
            // redialled. (Not ZMTP heartbeats: a master pushing back stops reading, PONGs too.)
            socket.set_tcp_keepalive_idle(30)?;
            socket.set_tcp_keepalive_intvl(10)?;
            socket.set_tcp_keepalive_cnt(3)?;
            socket.connect(endpoint)
        };
        setup().map_err(|e| format!("cannot set up the ZeroMQ socket for {endpoint}: {e}"))?;
        let counters = Arc::new(SenderCounters::default());
        let (tx, rx) = mpsc::sync_channel(4096);
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("zmq-push".into())
            .spawn(move || run(ctx, socket, rx, c))
            .map_err(|e| format!("cannot spawn the sender thread: {e}"))?;
        Ok(Sender {
            tx,
            thread: Some(thread),
            counters,
        })
    }

    /// Queues one message; never blocks on the network.
    pub fn send(&self, message: Outgoing) {
        if self.tx.send(Command::Send(message)).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushes what it can within `linger` and closes the socket.
    pub fn drain(mut self, linger: Duration) {
        let _ = self.tx.send(Command::Drain { linger });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn try_send(socket: &zmq::Socket, m: &Outgoing) -> Result<bool, zmq::Error> {
    match socket.send_multipart(m.frames.iter(), zmq::DONTWAIT) {
        Ok(()) => Ok(true),
        Err(zmq::Error::EAGAIN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Adds to the overflow, keeping only the newest snapshot and dropping oldest-first past the
/// limit. Returns how many messages were dropped.
fn push_overflow(overflow: &mut VecDeque<Outgoing>, m: Outgoing) -> u64 {
    let before = overflow.len();
    if m.class == Class::Snapshot {
        overflow.retain(|o| o.class != Class::Snapshot);
    }
    let mut dropped = (before - overflow.len()) as u64;
    overflow.push_back(m);
    while overflow.len() > OVERFLOW_LIMIT {
        let victim = overflow
            .iter()
            .position(|o| o.class != Class::Snapshot)
            .unwrap_or(0);
        overflow.remove(victim);
        dropped += 1;
    }
    dropped
}

fn run(
    ctx: zmq::Context,
    socket: zmq::Socket,
    rx: Receiver<Command>,
    counters: Arc<SenderCounters>,
) {
    let mut overflow: VecDeque<Outgoing> = VecDeque::new();
    let mut drain_deadline: Option<Instant> = None;
    loop {
        // Flush the overflow first, in order.
        while let Some(front) = overflow.front() {
            match try_send(&socket, front) {
                Ok(true) => {
                    overflow.pop_front();
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "zmq send failed; message dropped");
                    overflow.pop_front();
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        counters
            .overflow
            .store(overflow.len() as u64, Ordering::Relaxed);
        if let Some(deadline) = drain_deadline {
            if overflow.is_empty() || Instant::now() >= deadline {
                if !overflow.is_empty() {
                    tracing::warn!(
                        pending = overflow.len(),
                        "linger expired with messages unsent"
                    );
                }
                let linger = deadline.saturating_duration_since(Instant::now());
                let _ = socket.set_linger(linger.as_millis() as i32);
                drop(socket);
                // Terminating the context waits at most `linger` for libzmq's own queue.
                drop(ctx);
                return;
            }
        }
        let wait = if overflow.is_empty() && drain_deadline.is_none() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(20)
        };
        match rx.recv_timeout(wait) {
            Ok(Command::Send(m)) => {
                if overflow.is_empty() {
                    match try_send(&socket, &m) {
                        Ok(true) => {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, kind = m.kind, "zmq send failed; message dropped");
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let dropped = push_overflow(&mut overflow, m);
                if dropped > 0 {
                    counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                }
            }
            Ok(Command::Drain { linger }) => drain_deadline = Some(Instant::now() + linger),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                drain_deadline.get_or_insert_with(Instant::now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, class: Class) -> Outgoing {
        Outgoing {
            frames: Default::default(),
            kind: "x",
            seq,
            class,
        }
    }

    #[test]
    fn newest_snapshot_survives_overflow() {
        let mut q = VecDeque::new();
        assert_eq!(push_overflow(&mut q, msg(1, Class::Snapshot)), 0);
        for seq in 2..(OVERFLOW_LIMIT as u64 + 10) {
            push_overflow(&mut q, msg(seq, Class::Other));
        }
        assert_eq!(q.len(), OVERFLOW_LIMIT);
        assert_eq!(
            q[0].seq, 1,
            "the only snapshot is kept while events are dropped"
        );
        assert_eq!(
            push_overflow(&mut q, msg(5000, Class::Snapshot)),
            1,
            "the old snapshot is replaced"
        );
        assert_eq!(q.len(), OVERFLOW_LIMIT);
        assert!(q
            .iter()
            .filter(|m| m.class == Class::Snapshot)
            .map(|m| m.seq)
            .eq([5000]));
    }
}
