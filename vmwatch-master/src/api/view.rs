//! The API's JSON shapes of nodes and VM rows (docs/API.md), apart from the domain model: the
//! rules' `Node`, `Vm` and `Usage` are not serializable, so neither the database nor the rules
//! can change what these endpoints say by accident (rust-analyzer's serializable-boundary
//! rule). Journal entries and dead letters are served as the store reads them
//! (`store::JournalRow`, which is also the webhook's body).
//!
//! Each shape is written out field by field with its documented name, by hand: a derived view
//! struct would repeat every field of the model plus a conversion, and it would still be this
//! list that the documentation has to match.

use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::idle::{Resource, Sample, Usage};
use crate::rules::{Node, Vm};

/// A domain value in its API shape: `View(&node)` serializes as `GET /api/v1/nodes` shows it.
pub struct View<'a, T>(pub &'a T);

/// A list of domain values in their API shape (`#[serde(serialize_with = "view::all")]`).
pub fn all<T, S: Serializer>(items: &[T], s: S) -> Result<S::Ok, S::Error>
where
    for<'a> View<'a, T>: Serialize,
{
    s.collect_seq(items.iter().map(View))
}

/// `GET /api/v1/vms`: one page of rows. The bodies are serialized once, straight from the
/// rows (building a `serde_json::Value` first copied every row into a tree).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct VmsPage {
    #[serde(serialize_with = "all")]
    #[schema(value_type = Vec<super::openapi::Vm>)]
    pub vms: Vec<Vm>,
    pub total: u64,
    pub limit: u32,
    pub offset: u64,
    pub next_offset: Option<u64>,
}

/// `GET /api/v1/vms/{uuid}` and `/wait`: every row of one uuid (`reached` only from `/wait`).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct VmRows {
    pub uuid: String,
    /// Only from `/wait`: whether a row reached the state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<bool>,
    #[serde(serialize_with = "all")]
    #[schema(value_type = Vec<super::openapi::Vm>)]
    pub rows: Vec<Vm>,
}

/// `GET /api/v1/nodes`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Nodes {
    #[serde(serialize_with = "all")]
    #[schema(value_type = Vec<super::openapi::Node>)]
    pub nodes: Vec<Node>,
}

/// `GET /api/v1/vms/{uuid}/activity`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ActivityPage {
    pub uuid: String,
    pub from: u64,
    pub to: u64,
    /// The thresholds per window the idle rule uses now.
    pub thresholds: Thresholds,
    pub idle_windows: u32,
    /// Windows merged into each point (1: every window as it was).
    pub windows_per_point: u32,
    #[serde(serialize_with = "all")]
    #[schema(value_type = Vec<super::openapi::ActivityPoint>)]
    pub points: Vec<NodeBucket>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Thresholds {
    pub tx_pkts: u64,
    pub wr_reqs: u64,
}

/// A point of the activity history and the node it was measured on.
pub struct NodeBucket {
    pub node_id: String,
    pub bucket: crate::activity::Bucket,
}

/// One point: its time, node, windows, every counter's delta under its name (`null` when
/// unknown) and the idle flags.
impl Serialize for View<'_, NodeBucket> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (node_id, b) = (&self.0.node_id, &self.0.bucket);
        let mut m = s.serialize_struct("Point", 15)?;
        m.serialize_field("ts", &b.ts)?;
        m.serialize_field("node_id", node_id)?;
        m.serialize_field("windows", &b.windows)?;
        // Rounded: a 2.99 s window is 3 s, not 2.
        m.serialize_field(
            "window_s",
            &b.window_ms.saturating_add(500).div_euclid(1000),
        )?;
        for (name, d) in crate::activity::COUNTERS.iter().zip(b.deltas) {
            m.serialize_field(name, &d)?;
        }
        m.serialize_field("idle_net", &b.idle_net)?;
        m.serialize_field("idle_disk", &b.idle_disk)?;
        m.end()
    }
}

/// One node (`GET /api/v1/nodes`). `superseded` stays inside.
impl Serialize for View<'_, Node> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let mut m = s.serialize_struct("Node", 15)?;
        m.serialize_field("node_id", &*n.node_id)?;
        m.serialize_field("up", &n.up)?;
        m.serialize_field("libvirt_up", &n.libvirt_up)?;
        m.serialize_field("first_seen", &n.first_seen)?;
        m.serialize_field("last_seen", &n.last_seen)?;
        m.serialize_field("boot", &*n.boot)?;
        m.serialize_field("boot_ts", &n.boot_ts)?;
        m.serialize_field("last_seq", &n.last_seq)?;
        m.serialize_field("version", &*n.version)?;
        m.serialize_field("hostname", &*n.hostname)?;
        m.serialize_field("libvirt_version", &*n.libvirt_version)?;
        m.serialize_field("domains", &n.domains)?;
        m.serialize_field("gaps", &n.gaps)?;
        m.serialize_field("lost", &n.lost)?;
        m.serialize_field("libvirt_down_since", &n.libvirt_down_since)?;
        m.end()
    }
}

/// One VM row (`GET /api/v1/vms`, `/vms/{uuid}`, `/wait`).
impl Serialize for View<'_, Vm> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        let mut m = s.serialize_struct("Vm", 12)?;
        m.serialize_field("node_id", &*v.node_id)?;
        m.serialize_field("uuid", &*v.uuid)?;
        m.serialize_field("name", &v.name)?;
        m.serialize_field("state", &v.state)?;
        m.serialize_field("reason", &v.reason)?;
        m.serialize_field("state_since", &v.state_since)?;
        m.serialize_field("updated_at", &v.updated_at)?;
        m.serialize_field("usage", &View(&v.usage))?;
        m.serialize_field("duplicate", &v.duplicate)?;
        m.serialize_field("last_state", &v.last_state())?;
        m.serialize_field("unknown_since", &v.unknown_since())?;
        m.serialize_field("unknown_reason", &v.unknown_reason())?;
        m.end()
    }
}

/// A VM's counters and idle flags.
impl Serialize for View<'_, Usage> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let u = self.0;
        let mut m = s.serialize_struct("Usage", 6)?;
        m.serialize_field("sample", &u.sample.as_ref().map(View))?;
        m.serialize_field("nics", &u.nics)?;
        m.serialize_field("disks", &u.disks)?;
        m.serialize_field("net", &View(&u.net))?;
        m.serialize_field("disk", &View(&u.disk))?;
        m.serialize_field("last_window_ms", &u.last_window_ms)?;
        m.end()
    }
}

impl Serialize for View<'_, Sample> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let x = self.0;
        let mut m = s.serialize_struct("Sample", 6)?;
        m.serialize_field("ts", &x.ts)?;
        m.serialize_field("tx_pkts", &x.tx_pkts)?;
        m.serialize_field("wr_reqs", &x.wr_reqs)?;
        m.serialize_field("rx_pkts", &x.rx_pkts)?;
        m.serialize_field("rd_reqs", &x.rd_reqs)?;
        m.serialize_field("cpu_time_ns", &x.cpu_time_ns)?;
        m.end()
    }
}

impl Serialize for View<'_, Resource> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_struct("Resource", 5)?;
        m.serialize_field("idle", &r.idle)?;
        m.serialize_field("since", &r.since)?;
        m.serialize_field("quiet_windows", &r.quiet_windows)?;
        m.serialize_field("last_delta", &r.last_delta)?;
        m.serialize_field("no_device", &r.no_device)?;
        m.end()
    }
}

/// Fixtures for the tests of the views and their schemas.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    pub fn vm() -> Vm {
        Vm {
            node_id: "hv-01".into(),
            uuid: "u".into(),
            name: "n".into(),
            state: "running".into(),
            reason: "booted".into(),
            state_since: 1,
            updated_at: 2,
            usage: Usage {
                sample: Some(Sample {
                    ts: 3,
                    tx_pkts: 4,
                    wr_reqs: 5,
                    rx_pkts: 6,
                    rd_reqs: 7,
                    cpu_time_ns: 8,
                    bytes: None,
                }),
                nics: 1,
                disks: 1,
                ..Usage::default()
            },
            duplicate: false,
            unknown: None,
        }
    }

    pub fn node() -> Node {
        Node::for_test("hv-01")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented shape, key for key (docs/API.md "VM row"): a field renamed in the model
    /// must not rename it here.
    #[test]
    fn a_vm_row_has_the_documented_keys() {
        let vm = tests_support::vm();
        let got = serde_json::to_value(View(&vm)).expect("serializes");
        let want = serde_json::json!({
            "node_id": "hv-01", "uuid": "u", "name": "n", "state": "running",
            "reason": "booted", "state_since": 1, "updated_at": 2,
            "usage": {
                "sample": {"ts": 3, "tx_pkts": 4, "wr_reqs": 5, "rx_pkts": 6, "rd_reqs": 7,
                           "cpu_time_ns": 8},
                "nics": 1, "disks": 1,
                "net": {"idle": false, "since": null, "quiet_windows": 0, "last_delta": null,
                        "no_device": false},
                "disk": {"idle": false, "since": null, "quiet_windows": 0, "last_delta": null,
                         "no_device": false},
                "last_window_ms": null
            },
            "duplicate": false, "last_state": null, "unknown_since": null,
            "unknown_reason": null
        });
        assert_eq!(got, want);
    }
}
