//! Wire protocol v1: the four-frame HMAC envelope and the JSON payloads (docs/PROTOCOL.md).
//!
//! Encoding and authentication are pure functions. [`authenticate`] is the only way to obtain an
//! [`Authenticated`] message, so code holding one knows the frames, the node id and the HMAC were
//! checked, in the order the spec gives, before any JSON was parsed. The stateful checks (clock
//! skew, boot, sequence) belong to the master's rules.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;

/// Frame 1 of every message.
pub const TAG: &[u8] = b"vmwatch/1";
/// Length of frame 4, the raw HMAC-SHA256.
pub const MAC_LEN: usize = 32;
/// Upper bound on the domains one message may list (a bounded-everything guard).
pub const MAX_DOMAINS_PER_MESSAGE: usize = 20_000;

/// Domain states on the wire (`virDomainState` order).
pub const STATES: &[&str] = &[
    "nostate",
    "running",
    "blocked",
    "paused",
    "shutdown",
    "shutoff",
    "crashed",
    "pmsuspended",
];

/// Lifecycle events on the wire (`virDomainEventType` order), then `reboot`.
pub const EVENTS: &[&str] = &[
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
    "reboot",
];

/// Bounds on the strings of a payload (docs/PROTOCOL.md, "Bounds"). Over-long names and free
/// text are cut to these lengths; an over-long identifier makes the message `malformed`.
pub mod bounds {
    /// `boot`, `uuid`: longer is `malformed`.
    pub const ID: usize = 64;
    /// `name`: cut to this many bytes.
    pub const NAME: usize = 256;
    /// `state`, `event`, `detail`, `reason`: words of `a-z 0-9 _ -`, cut to this length.
    pub const WORD: usize = 32;
    /// `hostname`, `bye.reason`: cut to this many bytes.
    pub const TEXT: usize = 256;
    /// `libvirt_version`, `version`: cut to this many bytes.
    pub const VERSION: usize = 64;
    /// `boot_ts`, `seq`, `ts`, `event_ts`: at most 2^63 − 1, else `malformed`.
    pub const MAX_INT: u64 = i64::MAX as u64;
}

type HmacSha256 = Hmac<Sha256>;

/// A node id: 1–64 characters of `A-Za-z0-9._-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct NodeId(String);

impl NodeId {
    /// Validates the syntax.
    pub fn parse(s: &str) -> Result<NodeId, String> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!(
                "node id must be 1 to 64 characters long, got {}",
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "node id may only contain A-Z a-z 0-9 . _ -, found {c:?}"
            ));
        }
        Ok(NodeId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Fields common to every payload, plus the kind-specific body. Parsed by
/// [`Payload::from_json`]; the derived `Deserialize` exists only for its agreement test.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(test, derive(Deserialize))]
pub struct Payload {
    /// Random id of this agent process (a UUID).
    pub boot: String,
    /// Unix ms when the agent process started.
    pub boot_ts: u64,
    /// 1, 2, 3 … per boot, one per message.
    pub seq: u64,
    /// Unix ms when sent.
    pub ts: u64,
    #[serde(flatten)]
    pub body: Body,
}

impl Payload {
    /// Parses a payload's JSON: a UTF-8 object with the common fields and `kind` (a string:
    /// `snapshot`, `event`, `stats`, `heartbeat` or `bye`), then the body of that kind; unknown
    /// fields are ignored. Two plain passes instead of a derived `Deserialize` (`flatten` over
    /// an internally tagged enum), which copied every field into serde's `Content` buffer twice
    /// and was 17 % of the master's CPU at 100,000 heartbeats/s.
    ///
    /// Unknown fields are skipped, not read: their syntax is checked, but not their numbers'
    /// range or a lone `\uD800` escape in them (the frame as a whole must be UTF-8). The
    /// derived parser also took `kind` as a variant index (`"kind": 3`); this one does not.
    pub fn from_json(json: &[u8]) -> serde_json::Result<Payload> {
        #[derive(Deserialize)]
        struct Head<'a> {
            boot: String,
            boot_ts: u64,
            seq: u64,
            ts: u64,
            #[serde(borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        // Checked once here, so that skipped strings are UTF-8 too.
        let json = std::str::from_utf8(json).map_err(serde::de::Error::custom)?;
        let head: Head<'_> = serde_json::from_str(json)?;
        let body = match head.kind.as_ref() {
            "snapshot" => Body::Snapshot(serde_json::from_str(json)?),
            "event" => Body::Event(serde_json::from_str(json)?),
            "stats" => Body::Stats(serde_json::from_str(json)?),
            "heartbeat" => Body::Heartbeat(serde_json::from_str(json)?),
            "bye" => Body::Bye(serde_json::from_str(json)?),
            other => return Err(serde::de::Error::unknown_variant(other, &Body::KINDS)),
        };
        Ok(Payload {
            boot: head.boot,
            boot_ts: head.boot_ts,
            seq: head.seq,
            ts: head.ts,
            body,
        })
    }
}

/// The kind-specific part of a payload; `kind` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(test, derive(Deserialize))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Snapshot(Snapshot),
    Event(DomainEvent),
    Stats(Stats),
    Heartbeat(Heartbeat),
    Bye(Bye),
}

impl Body {
    /// Every `kind` on the wire, in the order of the variants.
    pub const KINDS: [&'static str; 5] = ["snapshot", "event", "stats", "heartbeat", "bye"];

    pub fn kind(&self) -> &'static str {
        Body::KINDS[match self {
            Body::Snapshot(_) => 0,
            Body::Event(_) => 1,
            Body::Stats(_) => 2,
            Body::Heartbeat(_) => 3,
            Body::Bye(_) => 4,
        }]
    }
}

/// One domain as the snapshot lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    pub uuid: String,
    pub name: String,
    pub state: String,
    pub reason: String,
}

/// Every domain libvirt knows on the host, active or not. Authoritative for its node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub domains: Vec<DomainState>,
    pub hostname: String,
    pub libvirt_version: String,
}

/// A lifecycle (or reboot) event, with the state re-read from libvirt after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEvent {
    pub uuid: String,
    pub name: String,
    pub event: String,
    pub detail: String,
    pub state: String,
    pub reason: String,
    /// Unix ms when libvirt reported the event.
    pub event_ts: u64,
}

/// Cumulative counters of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DomainStats {
    pub uuid: String,
    pub name: String,
    pub state: String,
    pub tx_pkts: u64,
    pub rx_pkts: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub wr_reqs: u64,
    pub rd_reqs: u64,
    pub wr_bytes: u64,
    pub rd_bytes: u64,
    pub cpu_time_ns: u64,
    pub nics: u32,
    pub disks: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub interval_s: u64,
    pub domains: Vec<DomainStats>,
}

/// `libvirt` is `up` or `down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub libvirt: String,
    pub domains: u64,
    pub version: String,
    pub uptime_s: u64,
    /// The agent's own counters (absent from older agents: then zero).
    #[serde(default)]
    pub agent: AgentCounters,
}

/// What a node agent reports about itself in every heartbeat. Each field is optional on the
/// wire (docs/PROTOCOL.md: "absent fields are 0"), so an agent may report only what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AgentCounters {
    /// Messages handed to ZeroMQ since the agent started.
    pub sent: u64,
    /// Lifecycle events sent since the agent started.
    pub events: u64,
    /// Messages dropped because the send queue was full.
    pub dropped: u64,
    /// Messages waiting beyond ZeroMQ's queue (SNDHWM) right now.
    pub overflow: u64,
    /// Successful reconnections to libvirt since the agent started.
    pub libvirt_reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bye {
    pub reason: String,
}

/// HMAC-SHA256 over `TAG ‖ 0x00 ‖ node_id ‖ 0x00 ‖ payload`.
pub fn sign(key: &[u8], node_id: &[u8], payload: &[u8]) -> [u8; MAC_LEN] {
    mac_over(key, node_id, payload)
        .finalize()
        .into_bytes()
        .into()
}

fn mac_over(key: &[u8], node_id: &[u8], payload: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(TAG);
    mac.update(&[0]);
    mac.update(node_id);
    mac.update(&[0]);
    mac.update(payload);
    mac
}

/// Encodes and signs one message: the four frames to send as one ZeroMQ multipart message.
pub fn encode(key: &[u8], node_id: &NodeId, payload: &Payload) -> [Vec<u8>; 4] {
    // Serialising these plain structs to JSON cannot fail (no maps with non-string keys).
    let json = serde_json::to_vec(payload).expect("payload serialises");
    let mac = sign(key, node_id.as_str().as_bytes(), &json);
    [
        TAG.to_vec(),
        node_id.as_str().as_bytes().to_vec(),
        json,
        mac.to_vec(),
    ]
}

/// Why a message was rejected; each has its own metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reject {
    /// Not exactly four frames.
    FrameCount,
    /// Frame 1 is not `vmwatch/1`.
    Tag,
    /// Frame 2 is not a valid node id.
    NodeId,
    /// No secret is configured for this node.
    UnknownNode,
    /// The HMAC does not match.
    Signature,
    /// Authenticated, but the payload is not valid JSON of a known kind, or breaks a bound.
    Malformed,
    /// `ts` is further than `max_clock_skew` ahead of the master's clock.
    ClockSkew,
    /// `ts` is older than `max_message_age`.
    TooOld,
    /// A boot id this node has left behind (a replay of an older agent process).
    StaleBoot,
    /// `seq` not greater than the last seen in this boot.
    Replay,
    /// A new node id beyond `max_nodes`.
    TooManyNodes,
    /// Frame 2 names another node than the CURVE key of the connection it came on.
    IdentityMismatch,
    /// The node was revoked.
    Revoked,
    /// Stats closer together than `min_stats_interval` or half the node's `interval_s`.
    TooFrequent,
    /// The message would give its node more than `max_vms_per_node` VM rows.
    TooManyVms,
}

impl Reject {
    pub const ALL: [Reject; 15] = [
        Reject::FrameCount,
        Reject::Tag,
        Reject::NodeId,
        Reject::UnknownNode,
        Reject::Signature,
        Reject::Malformed,
        Reject::ClockSkew,
        Reject::TooOld,
        Reject::StaleBoot,
        Reject::Replay,
        Reject::TooManyNodes,
        Reject::IdentityMismatch,
        Reject::Revoked,
        Reject::TooFrequent,
        Reject::TooManyVms,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::FrameCount => "frame_count",
            Reject::Tag => "bad_tag",
            Reject::NodeId => "bad_node_id",
            Reject::UnknownNode => "unknown_node",
            Reject::Signature => "bad_signature",
            Reject::Malformed => "malformed",
            Reject::ClockSkew => "clock_skew",
            Reject::TooOld => "too_old",
            Reject::StaleBoot => "stale_boot",
            Reject::Replay => "replay",
            Reject::TooManyNodes => "too_many_nodes",
            Reject::IdentityMismatch => "identity_mismatch",
            Reject::Revoked => "revoked",
            Reject::TooFrequent => "too_frequent",
            Reject::TooManyVms => "too_many_vms",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message whose envelope and HMAC were verified. Only [`authenticate`] builds one.
#[derive(Debug, Clone)]
pub struct Authenticated {
    node_id: NodeId,
    payload: Payload,
}

impl Authenticated {
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }
    pub fn payload(&self) -> &Payload {
        &self.payload
    }
    pub fn into_parts(self) -> (NodeId, Payload) {
        (self.node_id, self.payload)
    }
}

/// A rejection, with the node id when frame 2 was readable (for logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: Reject,
    pub node_id: Option<String>,
    pub detail: String,
}

/// Checks frame count, tag, node id syntax, then the HMAC with the node's key (constant time),
/// then parses the payload. `key_for` returns the node's secret, or `None` if it has none.
pub fn authenticate<K: AsRef<[u8]>>(
    frames: &[impl AsRef<[u8]>],
    key_for: impl FnOnce(&NodeId) -> Option<K>,
) -> Result<Authenticated, Rejected> {
    let reject = |reason, node_id: Option<&NodeId>, detail: String| Rejected {
        reason,
        node_id: node_id.map(|n| n.as_str().to_owned()),
        detail,
    };
    if frames.len() != 4 {
        return Err(reject(
            Reject::FrameCount,
            None,
            format!("expected 4 frames, got {}", frames.len()),
        ));
    }
    if frames[0].as_ref() != TAG {
        return Err(reject(Reject::Tag, None, "frame 1 is not vmwatch/1".into()));
    }
    let node_id = std::str::from_utf8(frames[1].as_ref())
        .map_err(|_| "node id is not UTF-8".to_owned())
        .and_then(NodeId::parse)
        .map_err(|e| reject(Reject::NodeId, None, e))?;
    let Some(key) = key_for(&node_id) else {
        return Err(reject(
            Reject::UnknownNode,
            Some(&node_id),
            "no secret configured for this node".into(),
        ));
    };
    let payload = frames[2].as_ref();
    let mac = mac_over(key.as_ref(), node_id.as_str().as_bytes(), payload);
    if mac.verify_slice(frames[3].as_ref()).is_err() {
        return Err(reject(
            Reject::Signature,
            Some(&node_id),
            "HMAC does not match".into(),
        ));
    }
    let mut payload = Payload::from_json(payload)
        .map_err(|e| reject(Reject::Malformed, Some(&node_id), format!("payload: {e}")))?;
    bound(&mut payload).map_err(|e| reject(Reject::Malformed, Some(&node_id), e))?;
    let count = match &payload.body {
        Body::Snapshot(s) => s.domains.len(),
        Body::Stats(s) => s.domains.len(),
        _ => 0,
    };
    if count > MAX_DOMAINS_PER_MESSAGE {
        return Err(reject(
            Reject::Malformed,
            Some(&node_id),
            format!("{count} domains in one message, limit {MAX_DOMAINS_PER_MESSAGE}"),
        ));
    }
    Ok(Authenticated { node_id, payload })
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A word of the vocabulary: kept if `known` lists it; otherwise `unknown-` and what is left
/// of it after dropping every character outside `a-z 0-9 _ -`, at most [`bounds::WORD`] long.
/// A word already of the form `unknown-…` (a newer libvirt's code) keeps its prefix once; a
/// bare `unknown` is the master's own word for "cannot be seen" and is rewritten like any other.
fn word(s: &mut String, known: &[&str]) {
    if known.contains(&s.as_str()) {
        return;
    }
    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
        .collect();
    let mut out = if clean.starts_with("unknown-") {
        clean
    } else {
        format!("unknown-{clean}")
    };
    cut(&mut out, bounds::WORD);
    *s = out;
}

/// A free word (`detail`, `reason`): `a-z 0-9 _ -` only, at most [`bounds::WORD`] long.
fn free_word(s: &mut String) {
    if s.len() <= bounds::WORD
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'))
    {
        return;
    }
    word(s, &[]);
}

fn id(s: &str, what: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > bounds::ID {
        return Err(format!(
            "{what} must be 1 to {} bytes long, got {}",
            bounds::ID,
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} may only contain A-Z a-z 0-9 - _ ., found {c:?}"
        ));
    }
    Ok(())
}

/// Applies the documented bounds to an authenticated payload: identifiers are checked, names
/// and free text cut, vocabulary words normalised (see [`bounds`]).
fn bound(p: &mut Payload) -> Result<(), String> {
    id(&p.boot, "boot")?;
    // The master stores these as SQLite integers (signed 64-bit): larger would not survive.
    let event_ts = match &p.body {
        Body::Event(e) => e.event_ts,
        _ => 0,
    };
    for (what, v) in [
        ("boot_ts", p.boot_ts),
        ("seq", p.seq),
        ("ts", p.ts),
        ("event_ts", event_ts),
    ] {
        if v > bounds::MAX_INT {
            return Err(format!("{what} {v} is above {}", bounds::MAX_INT));
        }
    }
    match &mut p.body {
        Body::Snapshot(s) => {
            for d in &mut s.domains {
                id(&d.uuid, "uuid")?;
                cut(&mut d.name, bounds::NAME);
                word(&mut d.state, STATES);
                free_word(&mut d.reason);
            }
            cut(&mut s.hostname, bounds::TEXT);
            cut(&mut s.libvirt_version, bounds::VERSION);
        }
        Body::Event(e) => {
            id(&e.uuid, "uuid")?;
            cut(&mut e.name, bounds::NAME);
            word(&mut e.event, EVENTS);
            free_word(&mut e.detail);
            word(&mut e.state, STATES);
            free_word(&mut e.reason);
        }
        Body::Stats(s) => {
            for d in &mut s.domains {
                id(&d.uuid, "uuid")?;
                cut(&mut d.name, bounds::NAME);
                word(&mut d.state, STATES);
            }
        }
        Body::Heartbeat(h) => {
            if h.libvirt != "up" && h.libvirt != "down" {
                return Err("heartbeat libvirt must be `up` or `down`".into());
            }
            h.domains = h.domains.min(bounds::MAX_INT);
            cut(&mut h.version, bounds::VERSION);
        }
        Body::Bye(b) => cut(&mut b.reason, bounds::TEXT),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef";

    fn node() -> NodeId {
        NodeId::parse("hv-01.example").unwrap()
    }

    fn payload(seq: u64) -> Payload {
        Payload {
            boot: "5f0c9e9e-1b1a-4c1e-9d7e-1f2e3d4c5b6a".into(),
            boot_ts: 1_700_000_000_000,
            seq,
            ts: 1_700_000_000_500,
            body: Body::Event(DomainEvent {
                uuid: "6b1e0c7e-0000-4000-8000-000000000001".into(),
                name: "vm1".into(),
                event: "started".into(),
                detail: "booted".into(),
                state: "running".into(),
                reason: "booted".into(),
                event_ts: 1_700_000_000_400,
            }),
        }
    }

    fn auth(frames: &[Vec<u8>]) -> Result<Authenticated, Reject> {
        authenticate(frames, |n| (n.as_str() == "hv-01.example").then_some(KEY))
            .map_err(|r| r.reason)
    }

    #[test]
    fn round_trip_every_kind() {
        let bodies = vec![
            Body::Snapshot(Snapshot {
                domains: vec![DomainState {
                    uuid: "u".into(),
                    name: "n".into(),
                    state: "shutoff".into(),
                    reason: "unknown".into(),
                }],
                hostname: "h".into(),
                libvirt_version: "9.0.0".into(),
            }),
            payload(1).body,
            Body::Stats(Stats {
                interval_s: 600,
                domains: vec![DomainStats {
                    uuid: "u".into(),
                    state: "running".into(),
                    tx_pkts: 3,
                    ..Default::default()
                }],
            }),
            Body::Heartbeat(Heartbeat {
                libvirt: "up".into(),
                domains: 3,
                version: "0.1.0".into(),
                uptime_s: 9,
                agent: AgentCounters {
                    sent: 4,
                    events: 1,
                    dropped: 0,
                    overflow: 0,
                    libvirt_reconnects: 2,
                },
            }),
            Body::Bye(Bye {
                reason: "sigterm".into(),
            }),
        ];
        for body in bodies {
            let p = Payload { body, ..payload(7) };
            let frames = encode(KEY, &node(), &p);
            let got = auth(frames.as_ref()).expect("authentic");
            assert_eq!(got.node_id(), &node());
            assert_eq!(got.payload(), &p);
        }
    }

    #[test]
    fn kind_is_on_the_wire() {
        let frames = encode(KEY, &node(), &payload(1));
        let v: serde_json::Value = serde_json::from_slice(&frames[2]).unwrap();
        assert_eq!(v["kind"], "event");
        assert_eq!(v["seq"], 1);
    }

    /// docs/PROTOCOL.md: the heartbeat's `agent` object is optional and so is each of its
    /// counters; an absent one is 0 (a client reporting only what it counts is not `malformed`).
    #[test]
    fn absent_agent_counters_are_zero() {
        let json = br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"heartbeat","libvirt":"up","domains":3,"version":"v","uptime_s":4,"agent":{"sent":7,"libvirt_reconnects":2}}"#;
        let Body::Heartbeat(h) = Payload::from_json(json).expect("accepted").body else {
            panic!("not a heartbeat")
        };
        assert_eq!(
            h.agent,
            AgentCounters {
                sent: 7,
                libvirt_reconnects: 2,
                ..AgentCounters::default()
            }
        );
        let none = br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"heartbeat","libvirt":"up","domains":3,"version":"v","uptime_s":4}"#;
        let Body::Heartbeat(h) = Payload::from_json(none).expect("accepted").body else {
            panic!("not a heartbeat")
        };
        assert_eq!(h.agent, AgentCounters::default());
    }

    /// `Payload::from_json` (the hot path) and the derived `Deserialize` agree on every kind,
    /// on unknown fields, escapes, field order, and on what they refuse.
    #[test]
    fn the_two_pass_parser_agrees_with_the_derived_one() {
        let cases: &[&str] = &[
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"bye","reason":"x"}"#,
            r#"{"kind":"bye","reason":"x","boot":"b","boot_ts":1,"seq":1,"ts":2,"extra":{"a":[1]}}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"heart\u0062eat","libvirt":"up","domains":3,"version":"v","uptime_s":4}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"heartbeat","libvirt":"up","domains":3,"version":"v","uptime_s":4,"agent":{"sent":1,"events":2,"dropped":3,"overflow":4,"libvirt_reconnects":5}}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"snapshot","domains":[{"uuid":"u","name":"n","state":"running","reason":"booted"}],"hostname":"h","libvirt_version":"9"}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"event","uuid":"u","name":"n","event":"started","detail":"booted","state":"running","reason":"booted","event_ts":1}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"stats","interval_s":600,"domains":[{"uuid":"u","state":"running","tx_pkts":1,"wr_reqs":2,"nics":1,"disks":1}]}"#,
            // Refused by both: unknown or missing kind, a body of another kind, a wrong type,
            // a missing common field, a duplicate field, not an object.
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"reboot"}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"reason":"x"}"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"event","reason":"x"}"#,
            r#"{"boot":"b","boot_ts":"1","seq":1,"ts":2,"kind":"bye","reason":"x"}"#,
            r#"{"boot_ts":1,"seq":1,"ts":2,"kind":"bye","reason":"x"}"#,
            r#"{"boot":"b","boot":"c","boot_ts":1,"seq":1,"ts":2,"kind":"bye","reason":"x"}"#,
            r#"[1,2]"#,
            r#"["b",1,1,2,"bye"]"#,
            r#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"bye","reason":"x"} trailing"#,
        ];
        for json in cases {
            let derived: Result<Payload, _> = serde_json::from_slice(json.as_bytes());
            let fast = Payload::from_json(json.as_bytes());
            assert_eq!(fast.as_ref().ok(), derived.as_ref().ok(), "{json}");
            assert_eq!(fast.is_ok(), derived.is_ok(), "{json}");
        }
        assert!(Payload::from_json(cases[0].as_bytes()).is_ok());
        // Where they differ on purpose: `kind` is a string, never a variant index, and the
        // frame is UTF-8 through and through, unknown fields included.
        let indexed = br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":4,"reason":"x"}"#;
        assert!(serde_json::from_slice::<Payload>(indexed).is_ok());
        assert!(Payload::from_json(indexed).is_err());
        let latin1 = b"{\"boot\":\"b\",\"boot_ts\":1,\"seq\":1,\"ts\":2,\"kind\":\"bye\",\"reason\":\"x\",\"x\":\"\xff\"}";
        assert!(Payload::from_json(latin1).is_err());
    }

    #[test]
    fn unknown_fields_are_accepted() {
        let json =
            br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"bye","reason":"x","new_field":[1]}"#;
        let mac = sign(KEY, b"hv-01.example", json);
        let frames = vec![
            TAG.to_vec(),
            b"hv-01.example".to_vec(),
            json.to_vec(),
            mac.to_vec(),
        ];
        assert!(auth(&frames).is_ok());
    }

    #[test]
    fn each_tampering_has_its_reason() {
        let good = encode(KEY, &node(), &payload(1)).to_vec();
        let mut tampered = good.clone();
        tampered[2][10] ^= 1;
        assert_eq!(auth(&tampered).unwrap_err(), Reject::Signature);

        let wrong_key = encode(b"another-secret-of-16", &node(), &payload(1)).to_vec();
        assert_eq!(auth(&wrong_key).unwrap_err(), Reject::Signature);

        let mut wrong_tag = good.clone();
        wrong_tag[0] = b"vmwatch/2".to_vec();
        assert_eq!(auth(&wrong_tag).unwrap_err(), Reject::Tag);

        assert_eq!(auth(&good[..3]).unwrap_err(), Reject::FrameCount);
        let mut five = good.clone();
        five.push(vec![]);
        assert_eq!(auth(&five).unwrap_err(), Reject::FrameCount);

        let mut bad_id = good.clone();
        bad_id[1] = b"hv 01".to_vec();
        assert_eq!(auth(&bad_id).unwrap_err(), Reject::NodeId);
        bad_id[1] = vec![0xff, 0xfe];
        assert_eq!(auth(&bad_id).unwrap_err(), Reject::NodeId);

        let other = NodeId::parse("hv-02").unwrap();
        let unknown = encode(KEY, &other, &payload(1)).to_vec();
        assert_eq!(auth(&unknown).unwrap_err(), Reject::UnknownNode);

        // Another node's id on this node's payload: the HMAC covers frame 2.
        let mut swapped = good.clone();
        swapped[1] = b"hv-01.examplf".to_vec();
        assert!(auth(&swapped).is_err());

        let mut short_mac = good;
        short_mac[3].truncate(31);
        assert_eq!(auth(&short_mac).unwrap_err(), Reject::Signature);
    }

    #[test]
    fn authentic_garbage_is_malformed() {
        for json in [
            &b"not json"[..],
            br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"nope"}"#,
            b"[]",
        ] {
            let mac = sign(KEY, b"hv-01.example", json);
            let frames = vec![
                TAG.to_vec(),
                b"hv-01.example".to_vec(),
                json.to_vec(),
                mac.to_vec(),
            ];
            assert_eq!(auth(&frames).unwrap_err(), Reject::Malformed);
        }
    }

    fn signed(json: &[u8]) -> Vec<Vec<u8>> {
        let mac = sign(KEY, b"hv-01.example", json);
        vec![
            TAG.to_vec(),
            b"hv-01.example".to_vec(),
            json.to_vec(),
            mac.to_vec(),
        ]
    }

    #[test]
    fn strings_are_bounded() {
        let mut p = payload(1);
        if let Body::Event(e) = &mut p.body {
            e.name = "é".repeat(1000);
            e.state = "running\"} 1\nvmwatch_nodes_up 4242\n# EOF".into();
            e.event = "STARTED".into();
            e.detail = "x".repeat(100);
            e.reason = "unknown-7".into();
        }
        let frames = encode(KEY, &node(), &p);
        let got = auth(frames.as_ref()).expect("authentic");
        let Body::Event(e) = &got.payload().body else {
            panic!("not an event")
        };
        assert_eq!(e.name.len(), 256);
        assert_eq!(e.state, "unknown-running1vmwatch_nodes_up");
        assert_eq!(e.event, "unknown-");
        assert_eq!(e.detail.len(), bounds::WORD);
        assert_eq!(e.reason, "unknown-7");

        // A node cannot claim the master's own `unknown` (it would hide the row from the
        // liveness and duplicate rules).
        let mut p = payload(2);
        if let Body::Event(e) = &mut p.body {
            e.state = "unknown".into();
        }
        let got = auth(encode(KEY, &node(), &p).as_ref()).expect("authentic");
        let Body::Event(e) = &got.payload().body else {
            panic!("not an event")
        };
        assert_eq!(e.state, "unknown-unknown");

        let long_uuid = format!(
            r#"{{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"event","uuid":"{}","name":"n","event":"started","detail":"booted","state":"running","reason":"booted","event_ts":1}}"#,
            "a".repeat(65)
        );
        assert_eq!(
            auth(&signed(long_uuid.as_bytes())).unwrap_err(),
            Reject::Malformed
        );
        let bad_hb = br#"{"boot":"b","boot_ts":1,"seq":1,"ts":2,"kind":"heartbeat","libvirt":"maybe","domains":0,"version":"v","uptime_s":1}"#;
        assert_eq!(auth(&signed(bad_hb)).unwrap_err(), Reject::Malformed);
    }

    #[test]
    fn node_id_rules() {
        assert!(NodeId::parse("a").is_ok());
        assert!(NodeId::parse(&"a".repeat(64)).is_ok());
        assert!(NodeId::parse(&"a".repeat(65)).is_err());
        assert!(NodeId::parse("").is_err());
        assert!(NodeId::parse("a/b").is_err());
        assert!(NodeId::parse("ä").is_err());
    }

    #[test]
    fn known_answer() {
        // The worked example of docs/PROTOCOL.md, byte for byte.
        let payload = br#"{"boot":"0b7c5a5e-3f5e-4b8e-9a53-2d0c8f1e6a10","boot_ts":1795377600000,"seq":7,"ts":1795377631250,"kind":"event","uuid":"4f8e1c2a-9d3b-4e6f-8a7c-1b2d3e4f5a6b","name":"web-01","event":"started","detail":"booted","state":"running","reason":"booted","event_ts":1795377631247}"#;
        assert_eq!(payload.len(), 272);
        let key = b"correct horse battery staple";
        let mac = sign(key, b"hv-01", payload);
        assert_eq!(
            hex::encode(mac),
            "c8604c9db6a7831827ef742687e828fbdae0efb1bdd9d5c5307ced87d2402701"
        );
        let frames = vec![
            TAG.to_vec(),
            b"hv-01".to_vec(),
            payload.to_vec(),
            mac.to_vec(),
        ];
        // The default mode: the HMAC key is hv-01's derived node secret.
        let node_secret = crate::keys::node_secret(key, &NodeId::parse("hv-01").unwrap());
        assert_eq!(
            hex::encode(sign(node_secret.as_bytes(), b"hv-01", payload)),
            "53dd7166e3a9477598c0af165fb7c6ef6a5f4e297180efdb6511cccdc7ff5e16"
        );
        let m = authenticate(&frames, |_| Some(&key[..])).unwrap();
        assert_eq!(m.payload().seq, 7);
        // Our own encoder produces the same bytes for the same payload.
        let again = encode(key, m.node_id(), m.payload());
        assert_eq!(again[2], payload.to_vec());
    }
}
