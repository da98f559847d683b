//! Containment of a compromised node (SPEC §11): what one node-port connection can make the
//! master hold before its messages are whole and read is bounded. Pure: the shell (`ingest`)
//! feeds it the connections the socket monitor reports, the bytes of every whole message ingest
//! reads from each (`ZMQ_SRCFD`), and at each check the kernel's count of bytes received on
//! each (`TCP_INFO`); it answers which connections to close.
//!
//! Why this and not a pre-authentication child process: libzmq buffers a multipart message
//! whole until its last frame, and counts only whole messages against the HWM, so neither
//! `ZMQ_MAXMSGSIZE` (one frame) nor the HWM bounds it. Received minus read is exactly what libzmq
//! (and the kernel's receive buffer, which `ZMQ_RCVBUF` keeps small) holds for a connection, so
//! the one connection over its bound is closed and no other node loses anything; a child process
//! under a memory limit would drop every node's connections when one peer filled it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Wire bytes of one frame of `len` bytes under CURVE: the ZMTP frame header (≤ 9), the
/// `\x07MESSAGE` command name (8), the nonce (8), the box's MAC (16) and flags byte (1). Counting
/// the larger header for every frame errs towards crediting a connection with slightly more than
/// it sent, by at most 7 bytes a frame.
pub fn wire_bytes(len: usize) -> u64 {
    len as u64 + 42
}

/// Bytes a connection may hold beyond its limit without being closed: the handshake (greeting,
/// HELLO, INITIATE with its metadata) and libzmq's read buffer.
pub const SLACK: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes received and not yet read as whole messages, per connection.
    pub per_connection: u64,
    /// The same over all connections together.
    pub total: u64,
}

impl Limits {
    /// From `max_message_bytes`: one whole message of the largest size and 1 MiB more per
    /// connection. Measured (tests/attack/raw_curve.py, empty frames with MORE): libzmq holds
    /// 4.1 bytes of memory per byte received of such frames, so a connection closed at 2 MiB
    /// pending plus what arrives within one check (≤ 20 ms) stays under SPEC §11's
    /// `max_message_bytes` × 4 + 16 MiB; large frames cost about their size. 64 MiB over all
    /// connections (256 MiB of memory at that ratio).
    pub fn for_max_message(max_message_bytes: u64) -> Limits {
        Limits {
            per_connection: max_message_bytes + 1024 * 1024,
            total: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub peer: Option<SocketAddr>,
    /// Wire bytes of the whole messages ingest read from it.
    pub delivered: u64,
    /// The node id its CURVE key maps to, once a message said (`User-Id`), or `fleet`.
    pub node: Option<String>,
    /// Being closed: counted once, not again.
    pub closing: bool,
    /// Bytes received and not yet read, at the last check.
    pub pending: u64,
    /// `delivered` at the last check: a connection ingest keeps reading whole messages from is
    /// a fast sender, not one stuck in an unfinished message.
    pub delivered_at_check: u64,
}

/// Why a connection is to be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It alone held more than `per_connection`.
    Connection,
    /// All together held more than `total`, and it held the most.
    Total,
}

impl Why {
    pub fn label(self) -> &'static str {
        match self {
            Why::Connection => "unfinished_message",
            Why::Total => "memory_total",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub fd: RawFd,
    pub pending: u64,
    pub why: Why,
}

/// Every connection by descriptor. A vector indexed by the descriptor, not a map: ingest
/// credits a message to its connection for every message it reads, and descriptors are small
/// integers below the descriptor limit.
#[derive(Debug, Default)]
pub struct Connections {
    conns: Vec<Option<Conn>>,
    count: usize,
    /// Connections per peer address, for the per-address cap.
    by_ip: HashMap<std::net::IpAddr, usize>,
}

/// Descriptors above this are not tracked (no real descriptor limit reaches it).
const MAX_FD: usize = 1 << 22;

impl Connections {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn get(&self, fd: RawFd) -> Option<&Conn> {
        self.conns.get(usize::try_from(fd).ok()?)?.as_ref()
    }

    pub fn get_mut(&mut self, fd: RawFd) -> Option<&mut Conn> {
        self.conns.get_mut(usize::try_from(fd).ok()?)?.as_mut()
    }

    /// The entry of `fd`, made if new; `None` for a descriptor that cannot be one.
    fn entry(&mut self, fd: RawFd) -> Option<&mut Conn> {
        let i = usize::try_from(fd).ok().filter(|i| *i < MAX_FD)?;
        if i >= self.conns.len() {
            self.conns.resize_with(i + 1, || None);
        }
        let slot = &mut self.conns[i];
        if slot.is_none() {
            *slot = Some(Conn::default());
            self.count += 1;
        }
        slot.as_mut()
    }

    /// The socket monitor reported a new connection on `fd`.
    /// Returns how many connections its address now holds.
    pub fn accepted(&mut self, fd: RawFd, peer: Option<SocketAddr>) -> usize {
        // A message read before the event was processed may have made an entry already.
        let Some(c) = self.entry(fd) else {
            return 0;
        };
        let counted = c.peer.is_some();
        c.peer = c.peer.or(peer);
        if let (false, Some(p)) = (counted, peer) {
            *self.by_ip.entry(p.ip()).or_default() += 1;
        }
        peer.map_or(0, |p| self.by_ip.get(&p.ip()).copied().unwrap_or(0))
    }

    /// The socket monitor reported `fd` closed.
    pub fn gone(&mut self, fd: RawFd) {
        let Some(c) = usize::try_from(fd)
            .ok()
            .and_then(|i| self.conns.get_mut(i))
            .and_then(Option::take)
        else {
            return;
        };
        self.count -= 1;
        if let Some(ip) = c.peer.map(|p| p.ip()) {
            if let Some(n) = self.by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.by_ip.remove(&ip);
                }
            }
        }
    }

    /// Ingest read a whole message of `bytes` wire bytes that came on `fd`.
    pub fn delivered(&mut self, fd: RawFd, bytes: u64, node: Option<&str>) {
        let Some(c) = self.entry(fd) else {
            return;
        };
        c.delivered = c.delivered.saturating_add(bytes);
        if let (None, Some(n)) = (&c.node, node) {
            c.node = Some(n.to_owned());
        }
    }

    fn iter(&self) -> impl Iterator<Item = (RawFd, &Conn)> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i as RawFd, c.as_ref()?)))
    }

    /// The connections of `node` not yet being closed (a revoked node's).
    pub fn of_node(&self, node: &str) -> Vec<RawFd> {
        self.iter()
            .filter(|(_, c)| !c.closing && c.node.as_deref() == Some(node))
            .map(|(fd, _)| fd)
            .collect()
    }

    /// One check: `received` gives the bytes the kernel received on each connection. Returns
    /// the connections to close (marked closing) and the bytes pending over all.
    ///
    /// A connection alone is closed only when it is over its bound *and* ingest read no whole
    /// message of it since the last check: a message that never finishes stops its
    /// connection's progress (ZMTP frames of one message come in order), while a fast sender's
    /// backlog is whole messages ingest keeps reading. `pushing_back`: ingest stopped reading
    /// lately (the core's queue was full: a slow or failing database), so whole messages wait
    /// in libzmq's pipes and no connection is judged alone. The total bound holds the memory
    /// in every case.
    pub fn check(
        &mut self,
        received: impl Fn(RawFd) -> Option<u64>,
        limits: Limits,
        pushing_back: bool,
    ) -> (Vec<Verdict>, u64) {
        let mut out = Vec::new();
        let mut total = 0u64;
        for (i, slot) in self.conns.iter_mut().enumerate() {
            let Some(c) = slot.as_mut() else { continue };
            let fd = i as RawFd;
            let Some(got) = received(fd) else { continue };
            // Credit beyond what arrived (a message read after its connection's descriptor was
            // reused) is dropped at each check, so it never hides more than one interval.
            c.delivered = c.delivered.min(got);
            c.pending = got - c.delivered;
            let progressed = c.delivered > c.delivered_at_check;
            c.delivered_at_check = c.delivered;
            if c.closing {
                continue;
            }
            total = total.saturating_add(c.pending);
            if !pushing_back && !progressed && c.pending > limits.per_connection + SLACK {
                c.closing = true;
                total = total.saturating_sub(c.pending);
                out.push(Verdict {
                    fd,
                    pending: c.pending,
                    why: Why::Connection,
                });
            }
        }
        if total > limits.total {
            let mut open: Vec<(RawFd, u64)> = self
                .iter()
                .filter(|(_, c)| !c.closing)
                .map(|(fd, c)| (fd, c.pending))
                .collect();
            open.sort_by_key(|c| std::cmp::Reverse(c.1));
            for (fd, pending) in open {
                if total <= limits.total || pending == 0 {
                    break;
                }
                total -= pending;
                if let Some(c) = self.get_mut(fd) {
                    c.closing = true;
                }
                out.push(Verdict {
                    fd,
                    pending,
                    why: Why::Total,
                });
            }
        }
        (out, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        per_connection: 1000,
        total: 2500 + 3 * SLACK,
    };

    #[test]
    fn a_connection_over_its_bound_is_closed_once_and_others_are_not() {
        let mut c = Connections::default();
        c.accepted(5, None);
        c.accepted(6, None);
        c.delivered(6, 500, Some("hv-2"));
        // fd 5 holds an unfinished message past its bound; fd 6 read everything it sent.
        let got = |fd| Some(if fd == 5 { 2000 + SLACK } else { 500 });
        let (v, _) = c.check(got, LIMITS, false);
        assert_eq!(
            v,
            vec![Verdict {
                fd: 5,
                pending: 2000 + SLACK,
                why: Why::Connection
            }]
        );
        // A connection ingest read from since the last check is a fast sender: judged only
        // once it stops making progress.
        let mut f = Connections::default();
        f.accepted(5, None);
        f.delivered(5, 100, Some("hv-5"));
        assert!(f.check(got, LIMITS, false).0.is_empty());
        assert_eq!(f.check(got, LIMITS, false).0.len(), 1);
        // While ingest pushes back, a big backlog is whole messages waiting: not judged alone.
        let mut d = Connections::default();
        d.accepted(5, None);
        assert!(d.check(got, LIMITS, true).0.is_empty());
        assert_eq!(d.check(got, LIMITS, false).0.len(), 1);
        // Closing: not reported again while libzmq tears it down.
        assert!(c.check(got, LIMITS, false).0.is_empty());
        c.gone(5);
        assert_eq!(c.len(), 1);
        // Per address: counted on accept, released on close.
        let a: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:4001".parse().unwrap();
        assert_eq!(c.accepted(10, Some(a)), 1);
        assert_eq!(c.accepted(11, Some(b)), 2);
        c.gone(10);
        assert_eq!(c.accepted(12, Some(a)), 2);
        assert_eq!(c.of_node("hv-2"), vec![6]);
    }

    #[test]
    fn the_total_bound_closes_the_largest_first() {
        let mut c = Connections::default();
        for fd in 1..=4 {
            c.accepted(fd, None);
        }
        // Each under its own bound, together over the total.
        let got = |fd: RawFd| Some(fd as u64 * 200 + SLACK);
        let (v, total) = c.check(got, LIMITS, false);
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].fd, v[0].why), (4, Why::Total));
        assert!(total <= LIMITS.total);
    }

    #[test]
    fn over_credit_is_dropped_at_each_check() {
        let mut c = Connections::default();
        c.accepted(7, None);
        // Credit for a message of a previous connection on the same descriptor.
        c.delivered(7, 10_000, None);
        assert!(c.check(|_| Some(100), LIMITS, false).0.is_empty());
        // From here every byte counts.
        let (v, _) = c.check(|_| Some(100 + 1001 + SLACK), LIMITS, false);
        assert_eq!(v.len(), 1);
    }
}
