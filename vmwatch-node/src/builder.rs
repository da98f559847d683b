//! The pure message builder: facts in, signed frames out (no I/O, the clock is an argument).
//!
//! One builder lives for the whole agent process: it owns the boot id, the boot time and the
//! sequence counter, so every message of this process carries `seq` 1, 2, 3 … in the order
//! built, whatever happens to the libvirt connection in between.

use vmwatch_common::config::Secret;
use vmwatch_common::protocol::{
    encode, AgentCounters, Body, Bye, DomainEvent, DomainState, DomainStats, Heartbeat, NodeId,
    Payload, Snapshot, Stats,
};

use crate::facts::{self, DomainCounters, DomainFacts, EventFacts};

/// How the core's queue treats a message when the socket is full (`core::push_bounded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Superseded by the next snapshot: only the latest one matters.
    Snapshot,
    /// Events, stats, heartbeats and bye: dropped oldest-first when the queue is full.
    Other,
}

/// One signed message ready for the socket.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frames: [Vec<u8>; 4],
    pub kind: &'static str,
    pub seq: u64,
    pub class: Class,
}

pub struct MessageBuilder {
    node_id: NodeId,
    key: Secret,
    boot: String,
    boot_ts: u64,
    seq: u64,
}

impl MessageBuilder {
    pub fn new(node_id: NodeId, key: Secret, boot: String, boot_ts: u64) -> MessageBuilder {
        MessageBuilder {
            node_id,
            key,
            boot,
            boot_ts,
            seq: 0,
        }
    }

    /// Signs `body` as the next message of this boot, sent at `now_ms`.
    pub fn build(&mut self, now_ms: u64, body: Body) -> Outgoing {
        let class = if matches!(body, Body::Snapshot(_)) {
            Class::Snapshot
        } else {
            Class::Other
        };
        let kind = body.kind();
        let payload = self.next_payload(now_ms, body);
        Outgoing {
            frames: encode(self.key.expose(), &self.node_id, &payload),
            kind,
            seq: payload.seq,
            class,
        }
    }

    /// The next payload of this boot, unsigned: `build` signs it; a test can sign it with a
    /// wrong key, or drop it to make a gap.
    pub fn next_payload(&mut self, now_ms: u64, body: Body) -> Payload {
        self.seq += 1;
        Payload {
            boot: self.boot.clone(),
            boot_ts: self.boot_ts,
            seq: self.seq,
            ts: now_ms,
            body,
        }
    }

    /// The node this builder signs for.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }
}

/// A `snapshot` body from the full domain list.
pub fn snapshot(domains: &[DomainFacts], hostname: &str, libvirt_version: &str) -> Body {
    let mut domains: Vec<DomainState> = domains
        .iter()
        .map(|d| DomainState {
            uuid: d.uuid.clone(),
            name: d.name.clone(),
            state: facts::state_name(d.state).into_owned(),
            reason: facts::reason_name(d.state, d.reason).into_owned(),
        })
        .collect();
    domains.sort_by(|a, b| a.uuid.cmp(&b.uuid));
    Body::Snapshot(Snapshot {
        domains,
        hostname: hostname.to_owned(),
        libvirt_version: libvirt_version.to_owned(),
    })
}

/// An `event` body.
pub fn event(f: &EventFacts) -> Body {
    let (event, detail) = if f.reboot {
        ("reboot".to_owned(), String::new())
    } else {
        (
            facts::event_name(f.event).into_owned(),
            facts::detail_name(f.event, f.detail).into_owned(),
        )
    };
    let (state, reason) = match f.current {
        Some((s, r)) => (
            facts::state_name(s).into_owned(),
            facts::reason_name(s, r).into_owned(),
        ),
        None if f.reboot => ("running".to_owned(), "unknown".to_owned()),
        None => (
            facts::state_implied_by_event(f.event).to_owned(),
            "unknown".to_owned(),
        ),
    };
    Body::Event(DomainEvent {
        uuid: f.uuid.clone(),
        name: f.name.clone(),
        event,
        detail,
        state,
        reason,
        event_ts: f.event_ts,
    })
}

/// A `heartbeat` body.
pub fn heartbeat(libvirt_up: bool, domains: u64, uptime_s: u64, agent: AgentCounters) -> Body {
    Body::Heartbeat(Heartbeat {
        libvirt: if libvirt_up { "up" } else { "down" }.to_owned(),
        domains,
        version: vmwatch_common::VERSION.to_owned(),
        uptime_s,
        agent,
    })
}

/// Domains per `stats` message: one domain is ≈ 300 bytes of JSON (names are bounded by
/// libvirt), so 500 stay far below the master's default 1 MiB limit.
pub const STATS_PER_MESSAGE: usize = 500;

/// Sums one domain's counters over all its interfaces and disks.
pub fn domain_stats(c: &DomainCounters) -> DomainStats {
    let get = |key: &str| c.fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
    let nics = get("net.count").unwrap_or(0);
    let disks = get("block.count").unwrap_or(0);
    let sum = |prefix: &str, count: u64, suffix: &str| -> u64 {
        (0..count)
            .filter_map(|i| get(&format!("{prefix}.{i}.{suffix}")))
            .fold(0u64, u64::wrapping_add)
    };
    let state = get("state.state")
        .and_then(|s| i32::try_from(s).ok())
        .unwrap_or(0);
    DomainStats {
        uuid: c.uuid.clone(),
        name: c.name.clone(),
        state: facts::state_name(state).into_owned(),
        tx_pkts: sum("net", nics, "tx.pkts"),
        rx_pkts: sum("net", nics, "rx.pkts"),
        tx_bytes: sum("net", nics, "tx.bytes"),
        rx_bytes: sum("net", nics, "rx.bytes"),
        wr_reqs: sum("block", disks, "wr.reqs"),
        rd_reqs: sum("block", disks, "rd.reqs"),
        wr_bytes: sum("block", disks, "wr.bytes"),
        rd_bytes: sum("block", disks, "rd.bytes"),
        cpu_time_ns: get("cpu.time").unwrap_or(0),
        nics: u32::try_from(nics).unwrap_or(u32::MAX),
        disks: u32::try_from(disks).unwrap_or(u32::MAX),
    }
}

/// `stats` bodies for one collection, split so that no message lists more than
/// [`STATS_PER_MESSAGE`] domains. An empty host still yields one (empty) message.
pub fn stats(counters: &[DomainCounters], interval_s: u64) -> Vec<Body> {
    let all: Vec<DomainStats> = counters.iter().map(domain_stats).collect();
    if all.is_empty() {
        return vec![Body::Stats(Stats {
            interval_s,
            domains: Vec::new(),
        })];
    }
    all.chunks(STATS_PER_MESSAGE)
        .map(|c| {
            Body::Stats(Stats {
                interval_s,
                domains: c.to_vec(),
            })
        })
        .collect()
}

/// A `bye` body.
pub fn bye(reason: &str) -> Body {
    Body::Bye(Bye {
        reason: reason.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmwatch_common::protocol::authenticate;

    fn builder() -> MessageBuilder {
        MessageBuilder::new(
            NodeId::parse("hv1").unwrap(),
            Secret::new("0123456789abcdef".into()).unwrap(),
            "boot-1".into(),
            1000,
        )
    }

    #[test]
    fn seq_counts_up_and_frames_verify() {
        let mut b = builder();
        let first = b.build(2000, heartbeat(true, 3, 1, AgentCounters::default()));
        let second = b.build(2001, bye("sigterm"));
        assert_eq!((first.seq, second.seq), (1, 2));
        let m = authenticate(&second.frames, |_| Some(&b"0123456789abcdef"[..])).unwrap();
        assert_eq!(m.payload().seq, 2);
        assert_eq!(m.payload().ts, 2001);
        assert_eq!(m.payload().boot_ts, 1000);
        assert_eq!(second.kind, "bye");
    }

    #[test]
    fn event_after_undefine_uses_implied_state() {
        let f = EventFacts {
            uuid: "u".into(),
            name: "n".into(),
            event: 1,
            detail: 0,
            reboot: false,
            event_ts: 5,
            current: None,
            persistent: true,
        };
        let Body::Event(e) = event(&f) else {
            panic!("not an event")
        };
        assert_eq!(
            (e.event.as_str(), e.detail.as_str(), e.state.as_str()),
            ("undefined", "removed", "shutoff")
        );
    }

    #[test]
    fn event_uses_reread_state_over_event() {
        let f = EventFacts {
            uuid: "u".into(),
            name: "n".into(),
            event: 2,
            detail: 0,
            reboot: false,
            event_ts: 5,
            current: Some((3, 1)),
            persistent: true,
        };
        let Body::Event(e) = event(&f) else {
            panic!("not an event")
        };
        assert_eq!(
            (e.event.as_str(), e.state.as_str(), e.reason.as_str()),
            ("started", "paused", "user")
        );
    }

    #[test]
    fn reboot_event() {
        let f = EventFacts {
            uuid: "u".into(),
            name: "n".into(),
            event: 0,
            detail: 0,
            reboot: true,
            event_ts: 5,
            current: Some((1, 1)),
            persistent: true,
        };
        let Body::Event(e) = event(&f) else {
            panic!("not an event")
        };
        assert_eq!(
            (e.event.as_str(), e.detail.as_str(), e.state.as_str()),
            ("reboot", "", "running")
        );
    }

    fn counters(fields: &[(&str, u64)]) -> DomainCounters {
        DomainCounters {
            uuid: "u".into(),
            name: "n".into(),
            fields: fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn stats_sum_over_nics_and_disks() {
        let c = counters(&[
            ("state.state", 1),
            ("net.count", 2),
            ("net.0.tx.pkts", 3),
            ("net.1.tx.pkts", 4),
            ("net.1.rx.bytes", 9),
            ("block.count", 2),
            ("block.0.wr.reqs", 10),
            ("block.1.wr.reqs", 5),
            ("block.1.rd.bytes", 512),
            ("cpu.time", 77),
            ("net.5.tx.pkts", 1000),
        ]);
        let s = domain_stats(&c);
        assert_eq!((s.state.as_str(), s.nics, s.disks), ("running", 2, 2));
        assert_eq!(
            (s.tx_pkts, s.rx_bytes, s.wr_reqs, s.rd_bytes, s.cpu_time_ns),
            (7, 9, 15, 512, 77)
        );
    }

    #[test]
    fn stats_of_a_domain_without_devices() {
        let s = domain_stats(&counters(&[("state.state", 5)]));
        assert_eq!(
            (s.state.as_str(), s.nics, s.disks, s.tx_pkts, s.wr_reqs),
            ("shutoff", 0, 0, 0, 0)
        );
    }

    #[test]
    fn stats_split_into_bounded_messages() {
        let many: Vec<DomainCounters> = (0..1201).map(|_| counters(&[])).collect();
        let bodies = stats(&many, 600);
        let sizes: Vec<usize> = bodies
            .iter()
            .map(|b| match b {
                Body::Stats(s) => s.domains.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, [500, 500, 201]);
        assert_eq!(stats(&[], 600).len(), 1);
    }

    #[test]
    fn snapshot_is_sorted_and_named() {
        let d = |u: &str, s| DomainFacts {
            uuid: u.into(),
            name: u.into(),
            state: s,
            reason: 0,
        };
        let Body::Snapshot(s) = snapshot(&[d("b", 1), d("a", 99)], "h", "9.0.0") else {
            panic!()
        };
        assert_eq!(s.domains[0].uuid, "a");
        assert_eq!(s.domains[0].state, "unknown-99");
        assert_eq!(s.domains[1].state, "running");
    }
}
