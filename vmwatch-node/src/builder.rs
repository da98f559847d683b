//! The pure message builder: facts in, signed frames out (no I/O, the clock is an argument).
//!
//! One builder lives for the whole agent process: it owns the boot id, the boot time and the
//! sequence counter, so every message of this process carries `seq` 1, 2, 3 … in the order
//! built, whatever happens to the libvirt connection in between.

use vmwatch_common::config::Secret;
use vmwatch_common::protocol::{
    encode, Body, Bye, DomainEvent, DomainState, Heartbeat, NodeId, Payload, Snapshot,
};

use crate::facts;
use crate::libvirt::DomainFacts;

/// How the sender treats a message when its queue is full.
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
        self.seq += 1;
        let kind = body.kind();
        let class = if matches!(body, Body::Snapshot(_)) {
            Class::Snapshot
        } else {
            Class::Other
        };
        let payload = Payload {
            boot: self.boot.clone(),
            boot_ts: self.boot_ts,
            seq: self.seq,
            ts: now_ms,
            body,
        };
        Outgoing {
            frames: encode(self.key.expose(), &self.node_id, &payload),
            kind,
            seq: self.seq,
            class,
        }
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

/// What an event callback reported, plus the state re-read afterwards (`None` if the domain
/// could no longer be read, e.g. after `undefined`).
#[derive(Debug, Clone)]
pub struct EventFacts {
    pub uuid: String,
    pub name: String,
    pub event: i32,
    pub detail: i32,
    pub reboot: bool,
    pub event_ts: u64,
    pub current: Option<(i32, i32)>,
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
pub fn heartbeat(libvirt_up: bool, domains: u64, uptime_s: u64) -> Body {
    Body::Heartbeat(Heartbeat {
        libvirt: if libvirt_up { "up" } else { "down" }.to_owned(),
        domains,
        version: vmwatch_common::VERSION.to_owned(),
        uptime_s,
    })
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
        let first = b.build(2000, heartbeat(true, 3, 1));
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
        };
        let Body::Event(e) = event(&f) else {
            panic!("not an event")
        };
        assert_eq!(
            (e.event.as_str(), e.detail.as_str(), e.state.as_str()),
            ("reboot", "", "running")
        );
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
