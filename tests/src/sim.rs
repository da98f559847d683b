//! A simulated node: the wire protocol's boot/sequence bookkeeping and signing, for tests and
//! benchmarks that speak to a real master without libvirt.

use anyhow::{anyhow, Result};
use vmwatch_common::keys;
use vmwatch_common::protocol::{encode, Body, NodeId, Payload};
use vmwatch_common::time::now_ms;

use crate::product::SECRET;

/// One simulated agent process: a node id, a boot, and `seq` counting up.
pub struct SimNode {
    pub id: NodeId,
    pub boot: String,
    pub boot_ts: u64,
    pub seq: u64,
}

impl SimNode {
    /// A new boot of node `id` started at `boot_ts` (unix ms).
    pub fn new(id: &str, boot_ts: u64) -> Result<SimNode> {
        Ok(SimNode {
            id: NodeId::parse(id).map_err(|e| anyhow!("node id {id}: {e}"))?,
            boot: format!("{id}-boot-{boot_ts}"),
            boot_ts,
            seq: 0,
        })
    }

    /// The next message of this boot, sent at `ts`, signed with the tests' secret.
    pub fn message(&mut self, ts: u64, body: Body) -> [Vec<u8>; 4] {
        let key = node_key(self.id.as_str());
        self.message_with_key(ts, body, key.as_bytes())
    }

    /// The next message sent now.
    pub fn message_now(&mut self, body: Body) -> [Vec<u8>; 4] {
        self.message(now_ms(), body)
    }

    /// The next message, signed with another key (to test rejections).
    pub fn message_with_key(&mut self, ts: u64, body: Body, key: &[u8]) -> [Vec<u8>; 4] {
        self.seq += 1;
        let payload = Payload {
            boot: self.boot.clone(),
            boot_ts: self.boot_ts,
            seq: self.seq,
            ts,
            body,
        };
        encode(key, &self.id, &payload)
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
