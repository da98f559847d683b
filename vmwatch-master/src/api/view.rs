//! The API's JSON shapes of nodes and VM rows (docs/API.md), apart from the domain model: the
//! rules' `Node`, `Vm` and `Usage` are not serializable, so neither the database nor the rules
//! can change what these endpoints say by accident (rust-analyzer's serializable-boundary
//! rule). Journal entries and dead letters are served as the store reads them
//! (`store::JournalRow`, which is also the webhook's body).

use serde::Serialize;

use crate::idle::{Resource, Sample, Usage};
use crate::rules::{Node, Vm};

/// One node (`GET /api/v1/nodes`).
#[derive(Debug, Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub up: bool,
    pub libvirt_up: bool,
    pub first_seen: u64,
    pub last_seen: u64,
    pub boot: String,
    pub boot_ts: u64,
    pub last_seq: u64,
    pub version: String,
    pub hostname: String,
    pub libvirt_version: String,
    pub domains: u64,
    pub gaps: u64,
    pub lost: u64,
    pub libvirt_down_since: u64,
}

impl From<Node> for NodeView {
    fn from(n: Node) -> NodeView {
        NodeView {
            node_id: n.node_id,
            up: n.up,
            libvirt_up: n.libvirt_up,
            first_seen: n.first_seen,
            last_seen: n.last_seen,
            boot: n.boot,
            boot_ts: n.boot_ts,
            last_seq: n.last_seq,
            version: n.version,
            hostname: n.hostname,
            libvirt_version: n.libvirt_version,
            domains: n.domains,
            gaps: n.gaps,
            lost: n.lost,
            libvirt_down_since: n.libvirt_down_since,
        }
    }
}

/// One VM row (`GET /api/v1/vms`, `/vms/{uuid}`, `/wait`).
#[derive(Debug, Serialize)]
pub struct VmView {
    pub node_id: String,
    pub uuid: String,
    pub name: String,
    pub state: String,
    pub reason: String,
    pub state_since: u64,
    pub updated_at: u64,
    pub usage: UsageView,
    pub duplicate: bool,
    pub last_state: Option<String>,
    pub unknown_since: Option<u64>,
    pub unknown_reason: Option<String>,
}

impl From<Vm> for VmView {
    fn from(v: Vm) -> VmView {
        VmView {
            node_id: v.node_id,
            uuid: v.uuid,
            name: v.name,
            state: v.state,
            reason: v.reason,
            state_since: v.state_since,
            updated_at: v.updated_at,
            usage: v.usage.into(),
            duplicate: v.duplicate,
            last_state: v.last_state,
            unknown_since: v.unknown_since,
            unknown_reason: v.unknown_reason,
        }
    }
}

/// A VM's counters and idle flags.
#[derive(Debug, Serialize)]
pub struct UsageView {
    pub sample: Option<SampleView>,
    pub nics: u32,
    pub disks: u32,
    pub net: ResourceView,
    pub disk: ResourceView,
    pub last_window_ms: Option<u64>,
}

impl From<Usage> for UsageView {
    fn from(u: Usage) -> UsageView {
        UsageView {
            sample: u.sample.map(SampleView::from),
            nics: u.nics,
            disks: u.disks,
            net: u.net.into(),
            disk: u.disk.into(),
            last_window_ms: u.last_window_ms,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SampleView {
    pub ts: u64,
    pub tx_pkts: u64,
    pub wr_reqs: u64,
    pub rx_pkts: u64,
    pub rd_reqs: u64,
    pub cpu_time_ns: u64,
}

impl From<Sample> for SampleView {
    fn from(s: Sample) -> SampleView {
        SampleView {
            ts: s.ts,
            tx_pkts: s.tx_pkts,
            wr_reqs: s.wr_reqs,
            rx_pkts: s.rx_pkts,
            rd_reqs: s.rd_reqs,
            cpu_time_ns: s.cpu_time_ns,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ResourceView {
    pub idle: bool,
    pub since: Option<u64>,
    pub quiet_windows: u32,
    pub last_delta: Option<u64>,
    pub no_device: bool,
}

impl From<Resource> for ResourceView {
    fn from(r: Resource) -> ResourceView {
        ResourceView {
            idle: r.idle,
            since: r.since,
            quiet_windows: r.quiet_windows,
            last_delta: r.last_delta,
            no_device: r.no_device,
        }
    }
}

/// Rows as views.
pub fn vms(rows: Vec<Vm>) -> Vec<VmView> {
    rows.into_iter().map(VmView::from).collect()
}
