//! A simulated node: the wire protocol's boot/sequence bookkeeping and signing, for tests and
//! benchmarks that speak to a real master without libvirt.

use anyhow::{anyhow, Result};
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
        self.message_with_key(ts, body, SECRET.as_bytes())
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
