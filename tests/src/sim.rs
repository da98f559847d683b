//! A simulated node: the wire protocol's boot/sequence bookkeeping and signing, for tests and
//! benchmarks that speak to a real master without libvirt.

use anyhow::{anyhow, Result};
use vmwatch_common::config::Secret;
use vmwatch_common::keys;
use vmwatch_common::protocol::{encode, Body, NodeId};
use vmwatch_common::time::now_ms;
use vmwatch_node::builder::MessageBuilder;

use crate::product::SECRET;

/// One simulated agent process: the node's own message builder (boot id, `seq`, signing) with
/// the node's key under the tests' secret.
pub struct SimNode {
    builder: MessageBuilder,
}

impl SimNode {
    /// A new boot of node `id` started at `boot_ts` (unix ms), with the boot id
    /// `{id}-boot-{boot_ts}`.
    pub fn new(id: &str, boot_ts: u64) -> Result<SimNode> {
        SimNode::with_boot(id, &format!("{id}-boot-{boot_ts}"), boot_ts)
    }

    /// A new boot of node `id` with the boot id `boot`.
    pub fn with_boot(id: &str, boot: &str, boot_ts: u64) -> Result<SimNode> {
        let node_id = NodeId::parse(id).map_err(|e| anyhow!("node id {id}: {e}"))?;
        let key = Secret::new(node_key(id)).map_err(|e| anyhow!("node key: {e}"))?;
        Ok(SimNode {
            builder: MessageBuilder::new(node_id, key, boot.to_owned(), boot_ts),
        })
    }

    /// The next message of this boot, sent at `ts`, signed with the node's key.
    pub fn message(&mut self, ts: u64, body: Body) -> [Vec<u8>; 4] {
        self.builder.build(ts, body).frames
    }

    /// The next message sent now.
    pub fn message_now(&mut self, body: Body) -> [Vec<u8>; 4] {
        self.message(now_ms(), body)
    }

    /// The next message, signed with another key (to test rejections).
    pub fn message_with_key(&mut self, ts: u64, body: Body, key: &[u8]) -> [Vec<u8>; 4] {
        let payload = self.builder.next_payload(ts, body);
        encode(key, self.builder.node_id(), &payload)
    }

    /// The simulated node's id.
    pub fn id(&self) -> &NodeId {
        self.builder.node_id()
    }

    /// Builds `n` messages that are never sent: the master sees a gap of `n`.
    pub fn lose(&mut self, n: u64) {
        for _ in 0..n {
            self.builder
                .next_payload(now_ms(), vmwatch_node::builder::bye("lost"));
        }
    }
}

/// Node `id`'s secret under the tests' master secret (`node_keys=derived`).
pub fn node_key(id: &str) -> String {
    match NodeId::parse(id) {
        Ok(n) => keys::node_secret(SECRET.as_bytes(), &n),
        Err(e) => panic!("node id {id}: {e}"),
    }
}

/// The master's CURVE public key under the tests' secret, as Z85.
pub fn master_key() -> String {
    keys::z85_encode(&keys::server_keypair(SECRET.as_bytes()).public)
}

/// The fleet transport secret key under the tests' secret, as Z85.
pub fn transport_key() -> String {
    keys::z85_encode(&keys::transport_keypair(SECRET.as_bytes()).secret)
}

/// A PUSH socket that completes the CURVE handshake with a master keyed by the tests' secret.
pub fn curve_push(ctx: &zmq::Context) -> Result<zmq::Socket> {
    let s = ctx.socket(zmq::PUSH)?;
    let transport = keys::transport_keypair(SECRET.as_bytes());
    s.set_curve_serverkey(&keys::server_keypair(SECRET.as_bytes()).public)?;
    s.set_curve_publickey(&transport.public)?;
    s.set_curve_secretkey(&transport.secret)?;
    Ok(s)
}

/// A PUSH socket presenting node `id`'s own CURVE key (SPEC §10), for a master keyed by the
/// tests' secret; the master accepts it only while `id` is enrolled.
pub fn node_curve_push(ctx: &zmq::Context, id: &str) -> Result<zmq::Socket> {
    let node = NodeId::parse(id).map_err(|e| anyhow!("node id {id}: {e}"))?;
    let s = ctx.socket(zmq::PUSH)?;
    let pair = keys::node_curve_keypair(SECRET.as_bytes(), &node);
    s.set_curve_serverkey(&keys::server_keypair(SECRET.as_bytes()).public)?;
    s.set_curve_publickey(&pair.public)?;
    s.set_curve_secretkey(&pair.secret)?;
    Ok(s)
}

/// Node `id`'s CURVE secret key under the tests' secret, as Z85 (`node_key=`).
pub fn node_curve_key(id: &str) -> String {
    match NodeId::parse(id) {
        Ok(n) => keys::z85_encode(&keys::node_curve_keypair(SECRET.as_bytes(), &n).secret),
        Err(e) => panic!("node id {id}: {e}"),
    }
}

/// A heartbeat body as a healthy agent sends it (libvirt up, no domains).
pub fn heartbeat() -> Body {
    Body::Heartbeat(vmwatch_common::protocol::Heartbeat {
        libvirt: "up".into(),
        domains: 0,
        version: "t".into(),
        uptime_s: 0,
        agent: Default::default(),
    })
}

/// A `started`/`booted` event of VM `uuid` named `name`, reported by libvirt at `event_ts`.
pub fn started(uuid: &str, name: &str, event_ts: u64) -> Body {
    Body::Event(vmwatch_common::protocol::DomainEvent {
        uuid: uuid.into(),
        name: name.into(),
        event: "started".into(),
        detail: "booted".into(),
        state: "running".into(),
        reason: "booted".into(),
        event_ts,
    })
}
