//! The master's decisions, without I/O: admit a message (clock skew, boot, sequence), apply it
//! to the inventory, derive liveness, and say what to write as [`Effect`]s.
//!
//! The caller (the core thread) owns an [`Inventory`] loaded from the database, feeds every
//! authenticated message to [`handle`] with the current time, and writes the returned effects
//! in one transaction. Nothing here reads a clock, a socket or a file, so the tests below drive
//! it directly.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use compact_str::CompactString;

use vmwatch_common::protocol::{
    AgentCounters, Authenticated, Body, DomainEvent, Heartbeat, Payload, Reject, Snapshot, Stats,
};

use crate::idle::{self, Usage};
use crate::rows::VmRows;

/// Parameters of the rules, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Distinct node ids kept; a message of a further new id is rejected (`too_many_nodes`).
    pub max_nodes: usize,
    pub max_clock_skew_ms: u64,
    /// A message queued at the node is accepted this long after it was sent.
    pub max_message_age_ms: u64,
    pub node_timeout_ms: u64,
    pub idle_windows: u32,
    /// A stats window with at most this many transmitted packets is quiet (`idle_tx_packets_max`).
    pub idle_tx_packets_max: u64,
    /// A stats window with at most this many disk write requests is quiet (`idle_wr_reqs_max`).
    pub idle_wr_reqs_max: u64,
    pub duplicate_grace_ms: u64,
    /// VM rows one node may hold (`max_vms_per_node`); beyond it `too_many_vms`.
    pub max_vms_per_node: usize,
    /// Stats windows of a node closer together than this (or than half its `interval_s`) are
    /// refused as `too_frequent` (`min_stats_interval`).
    pub min_stats_interval_ms: u64,
    /// The activity history keeps at most one point per VM per this window; finer windows
    /// merge into it (`activity_min_window`, 0: every window is a point).
    pub activity_min_window_ms: u64,
}

/// The current stats window of a node: when it began (node and master time) and the VMs its
/// messages listed so far (one collection may be split over several messages).
#[derive(Debug, Clone, Default)]
pub struct StatsWindow {
    boot: String,
    ts: u64,
    arrived: u64,
    /// Keyed hashes of the uuids listed so far: 8 bytes a VM, not a copy of each uuid (every
    /// node of a fleet always has a current window: 500,000 copies at 10,000 × 50). Two uuids
    /// of one node colliding would only make a part of a split collection look like a second
    /// window (`too_frequent`): 2^-64 a pair, under a key random to this master.
    seen: std::collections::HashSet<u64>,
    keys: std::hash::RandomState,
}

/// What the master knows of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Shared, like the other strings of the row: a node row is cloned into an effect with every
    /// message (a heartbeat's whole cost was 18 % that clone when they were `String`s).
    pub node_id: Arc<str>,
    /// `up` while messages arrive; `down` after `node_timeout` of silence or a `bye`.
    pub up: bool,
    pub libvirt_up: bool,
    pub first_seen: u64,
    pub last_seen: u64,
    pub boot: Arc<str>,
    pub boot_ts: u64,
    pub last_seq: u64,
    pub version: Arc<str>,
    pub hostname: Arc<str>,
    pub libvirt_version: Arc<str>,
    pub domains: u64,
    /// Number of sequence gaps seen, and messages lost in them.
    pub gaps: u64,
    pub lost: u64,
    /// Unix ms since when the node's libvirt has been down (0 while up).
    pub libvirt_down_since: u64,
    /// Boot ids this node has left behind, with when (unix ms); a message of one is a replay.
    pub superseded: Vec<(String, u64)>,
}

/// One VM row: one domain on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// The node row's own id, shared (one allocation per node, not per row).
    pub node_id: Arc<str>,
    /// Shared with the duplicate index, and cloned into every effect without allocating.
    pub uuid: Arc<str>,
    pub name: CompactString,
    pub state: CompactString,
    pub reason: CompactString,
    pub state_since: u64,
    pub updated_at: u64,
    /// Counters and idle flags (see `idle.rs`).
    pub usage: Usage,
    /// Active on two or more nodes for longer than the grace (see `duplicate.rs`).
    pub duplicate: bool,
    /// While the row reads `unknown`: the state last seen, since when, and why; `None`
    /// otherwise. Boxed: nearly every row is known, and three inline fields cost every row 64
    /// bytes (32 MB at 10,000 nodes × 50 VMs).
    pub unknown: Option<Box<Unknown>>,
}

/// What a row whose host cannot be seen keeps (API fields `last_state`, `unknown_since`,
/// `unknown_reason`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unknown {
    pub last_state: Option<CompactString>,
    pub since: Option<u64>,
    /// `node-down` or `libvirt-down`.
    pub reason: Option<String>,
}

impl Unknown {
    /// `None` when all three are `None` (a known row).
    pub fn boxed(
        last_state: Option<CompactString>,
        since: Option<u64>,
        reason: Option<String>,
    ) -> Option<Box<Unknown>> {
        if last_state.is_none() && since.is_none() && reason.is_none() {
            return None;
        }
        Some(Box::new(Unknown {
            last_state,
            since,
            reason,
        }))
    }
}

impl Vm {
    pub fn last_state(&self) -> Option<&str> {
        self.unknown.as_ref()?.last_state.as_deref()
    }

    pub fn unknown_since(&self) -> Option<u64> {
        self.unknown.as_ref()?.since
    }

    pub fn unknown_reason(&self) -> Option<&str> {
        self.unknown.as_ref()?.reason.as_deref()
    }
}

/// The state of a VM row whose host cannot be seen.
pub const UNKNOWN: &str = "unknown";

/// Superseded boot ids remembered per node, at most (the oldest go first).
pub const MAX_SUPERSEDED: usize = 64;

/// The kinds of journal entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    Lifecycle,
    Vanished,
    Idle,
    Active,
    Duplicate,
    Node,
    Gap,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Lifecycle => "lifecycle",
            EntryType::Vanished => "vanished",
            EntryType::Idle => "idle",
            EntryType::Active => "active",
            EntryType::Duplicate => "duplicate",
            EntryType::Node => "node",
            EntryType::Gap => "gap",
        }
    }

    pub fn parse(s: &str) -> Option<EntryType> {
        [
            EntryType::Lifecycle,
            EntryType::Vanished,
            EntryType::Idle,
            EntryType::Active,
            EntryType::Duplicate,
            EntryType::Node,
            EntryType::Gap,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// A journal entry before the database gives it an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub received_at: u64,
    pub event_ts: u64,
    pub node_id: String,
    pub uuid: String,
    pub name: String,
    pub kind: EntryType,
    pub event: String,
    pub detail: String,
    pub state: String,
}

/// A write the shell must perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    UpsertNode(Node),
    UpsertVm(Vm),
    RemoveVm {
        node_id: String,
        uuid: String,
    },
    /// A revoked node leaves the inventory (its VM rows go by `RemoveVm`).
    RemoveNode {
        node_id: String,
    },
    /// The core journaled this enrollment state (`enrolled`, `revoked`) of a node.
    EnrollmentJournaled {
        node_id: String,
        state: &'static str,
    },
    Journal(Entry),
    /// One stats window of a VM, for its activity history.
    Activity {
        node_id: String,
        uuid: String,
        point: crate::activity::Point,
    },
}

/// The inventory the rules decide over (a cache of the database).
#[derive(Debug, Default, Clone)]
pub struct Inventory {
    pub nodes: HashMap<String, Node>,
    pub vms: HashMap<String, VmRows>,
    /// Since when each uuid has been active on two or more nodes (kept in memory: after a
    /// master restart the grace starts again).
    pub dup_since: HashMap<Arc<str>, u64>,
    /// The duplicate rule's index of which nodes hold each uuid (see `duplicate.rs`).
    pub copies: crate::duplicate::Copies,
    /// Each node's current stats window (memory only: after a restart the first window is new).
    pub stats_windows: HashMap<String, StatsWindow>,
    /// Activity points shorter than `activity_min_window`, merging until they reach it, per
    /// (node, uuid) (memory only: a restart loses at most one window's point).
    pub activity_pending: HashMap<(String, String), crate::activity::Point>,
}

#[cfg(test)]
impl Node {
    /// A node row for tests: known, down, nothing else set.
    pub(crate) fn for_test(node_id: &str) -> Node {
        new_node(node_id, 0)
    }
}

#[cfg(test)]
impl Vm {
    /// A row for tests: `state` on `node`, named `vm-<uuid>`, nothing else set.
    pub(crate) fn for_test(node: &str, uuid: &str, state: &str) -> Vm {
        Vm {
            node_id: node.into(),
            uuid: uuid.into(),
            name: format!("vm-{uuid}").into(),
            state: state.into(),
            reason: "unknown".into(),
            state_since: 0,
            updated_at: 0,
            usage: Default::default(),
            duplicate: false,
            unknown: None,
        }
    }
}

impl Inventory {
    pub fn vm_count(&self) -> usize {
        self.vms.values().map(VmRows::len).sum()
    }
}

/// What an accepted message did, with what the shell counts and logs about it: the shell never
/// reads the message again.
#[derive(Debug)]
pub struct Outcome {
    pub node_id: String,
    /// The message's kind (`heartbeat`, `event`…), a metric label.
    pub kind: &'static str,
    /// When the node sent it (unix ms): the ingest latency runs from here.
    pub ts: u64,
    /// The agent's own counters, from a heartbeat.
    pub agent: Option<AgentCounters>,
    /// Messages lost before this one (a `seq` jump), if any.
    pub gap: Option<u64>,
    pub effects: Vec<Effect>,
}

/// A message the rules refused, with what the reject log and metrics say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: Reject,
    pub node_id: String,
    pub kind: &'static str,
}

/// One VM row a batch of effects writes (`state` is `None` when the row is removed): what
/// long-polls (`/wait`) are woken with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmChange {
    pub uuid: String,
    pub state: Option<String>,
}

/// The VM rows `effects` write, in order.
pub fn vm_changes(effects: &[Effect]) -> Vec<VmChange> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::UpsertVm(vm) => Some(VmChange {
                uuid: vm.uuid.to_string(),
                state: Some(vm.state.to_string()),
            }),
            Effect::RemoveVm { uuid, .. } => Some(VmChange {
                uuid: uuid.clone(),
                state: None,
            }),
            Effect::UpsertNode(_)
            | Effect::RemoveNode { .. }
            | Effect::EnrollmentJournaled { .. }
            | Effect::Journal(_)
            | Effect::Activity { .. } => None,
        })
        .collect()
}

/// How a message relates to what we know of its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The first message ever seen from this node.
    NewNode,
    /// A new agent process (boot) of a known node.
    NewBoot,
    /// The next message of the current boot, after `lost` missing ones.
    Next { lost: u64 },
}

/// Checks `ts` against the clock (not further ahead than `max_clock_skew`, not older than
/// `max_message_age`), then the boot (a superseded boot id is a replay; `boot_ts` is never
/// compared across boots, so a node whose clock was stepped back is never locked out), then
/// `seq` within the current boot.
pub fn admit(
    node: Option<&Node>,
    boot: &str,
    seq: u64,
    ts: u64,
    now: u64,
    rules: &Rules,
) -> Result<Admission, Reject> {
    if ts > now.saturating_add(rules.max_clock_skew_ms) {
        return Err(Reject::ClockSkew);
    }
    if now.saturating_sub(ts) > rules.max_message_age_ms {
        return Err(Reject::TooOld);
    }
    let Some(node) = node else {
        return Ok(Admission::NewNode);
    };
    if *boot != *node.boot {
        if node.superseded.iter().any(|(b, _)| b == boot) {
            return Err(Reject::StaleBoot);
        }
        // A forged new boot would need the node's key.
        return Ok(Admission::NewBoot);
    }
    if seq <= node.last_seq {
        return Err(Reject::Replay);
    }
    Ok(Admission::Next {
        lost: seq - node.last_seq - 1,
    })
}

fn entry(now: u64, node_id: &str, kind: EntryType, event: &str) -> Entry {
    Entry {
        received_at: now,
        event_ts: now,
        node_id: node_id.to_owned(),
        uuid: String::new(),
        name: String::new(),
        kind,
        event: event.to_owned(),
        detail: String::new(),
        state: String::new(),
    }
}

/// Applies one authenticated message at time `now`.
pub fn handle(
    inv: &mut Inventory,
    rules: &Rules,
    now: u64,
    msg: Authenticated,
) -> Result<Outcome, Refused> {
    let (node_id, payload) = msg.into_parts();
    let node_id = node_id.as_str().to_owned();
    let kind = payload.body.kind();
    let admitted = admit(
        inv.nodes.get(&node_id),
        &payload.boot,
        payload.seq,
        payload.ts,
        now,
        rules,
    )
    .and_then(|a| match a {
        Admission::NewNode if inv.nodes.len() >= rules.max_nodes => Err(Reject::TooManyNodes),
        a => Ok(a),
    });
    let admission = match admitted {
        Ok(a) => a,
        Err(reason) => {
            return Err(Refused {
                reason,
                node_id,
                kind,
            })
        }
    };
    if let Err(reason) = check_bounds(inv, rules, &node_id, &payload, now) {
        return Err(Refused {
            reason,
            node_id,
            kind,
        });
    }
    let mut out = Outcome {
        // Set at the end: until then `node_id` is borrowed.
        node_id: String::new(),
        kind,
        ts: payload.ts,
        agent: None,
        gap: None,
        effects: Vec::new(),
    };
    let node = get_or_insert(&mut inv.nodes, &node_id, || new_node(&node_id, now));
    record_arrival(node, admission, &payload, now, rules, &mut out);
    // First what the message says about the node itself, then the node row, then its VMs.
    node_facts(node, &payload.body, now, &mut out);
    out.effects.push(Effect::UpsertNode(node.clone()));
    let shared_id = node.node_id.clone();
    let vms = get_or_insert(&mut inv.vms, &node_id, VmRows::default);
    match payload.body {
        Body::Snapshot(s) => apply_snapshot(vms, &shared_id, s, now, &mut out),
        Body::Event(e) => apply_event(vms, &shared_id, e, now, &mut out),
        Body::Stats(stats) => apply_stats(
            vms,
            &mut inv.activity_pending,
            &shared_id,
            stats,
            payload.ts,
            now,
            rules,
            &mut out,
        ),
        Body::Bye(_) => mark_unknown(vms, &node_id, now, "node-down", &mut out.effects),
        Body::Heartbeat(_) => {}
    }
    out.node_id = node_id;
    Ok(out)
}

/// The value under `key`, made and inserted when missing. Looked up first, so that a known key
/// (every message but a new node's first) allocates nothing: `entry` takes an owned key.
pub(crate) fn get_or_insert<'a, V>(
    map: &'a mut HashMap<String, V>,
    key: &str,
    make: impl FnOnce() -> V,
) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), make());
    }
    let Some(value) = map.get_mut(key) else {
        unreachable!("inserted above");
    };
    value
}

/// The bounds one node's messages may not push the master past (SPEC §11), checked after
/// admission and before anything changes: its VM rows (`too_many_vms`) and its stats rate
/// (`too_frequent`). A stats window that passes becomes the node's current one.
fn check_bounds(
    inv: &mut Inventory,
    rules: &Rules,
    node_id: &str,
    payload: &Payload,
    now: u64,
) -> Result<(), Reject> {
    let rows = inv.vms.get(node_id);
    match &payload.body {
        Body::Snapshot(s) if s.domains.len() > rules.max_vms_per_node => Err(Reject::TooManyVms),
        Body::Event(e) => {
            let known = rows.is_some_and(|v| v.contains_key(&e.uuid));
            let full = rows.map_or(0, VmRows::len) >= rules.max_vms_per_node;
            if !known && full && !(e.event == "undefined" && e.state == "shutoff") {
                return Err(Reject::TooManyVms);
            }
            Ok(())
        }
        Body::Stats(st) => {
            let gap = rules
                .min_stats_interval_ms
                .max(st.interval_s.saturating_mul(500));
            let w = inv.stats_windows.entry(node_id.to_owned()).or_default();
            // 10 % of the gap is timer jitter, not a second window.
            let near = |elapsed: u64| elapsed.saturating_mul(10) < gap.saturating_mul(9);
            let same_window = w.boot == payload.boot
                && near(payload.ts.saturating_sub(w.ts))
                && near(now.saturating_sub(w.arrived));
            if !same_window {
                w.boot.clone_from(&payload.boot);
                w.ts = payload.ts;
                w.arrived = now;
                w.seen.clear();
            } else if st
                .domains
                .iter()
                .any(|d| w.seen.contains(&w.keys.hash_one(&d.uuid)))
            {
                // A part of a split collection lists other VMs; a second window lists the same.
                return Err(Reject::TooFrequent);
            }
            let keys = &w.keys;
            w.seen
                .extend(st.domains.iter().map(|d| keys.hash_one(&d.uuid)));
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Removes a revoked node from the inventory: a `vanished` entry per VM, the node row, and a
/// `node`/`revoked` entry (SPEC §10).
pub fn revoke_node(inv: &mut Inventory, node_id: &str, now: u64) -> Vec<Effect> {
    let mut effects = Vec::new();
    for vm in inv.vms.remove(node_id).unwrap_or_default() {
        let uuid = vm.uuid.to_string();
        inv.activity_pending
            .remove(&(node_id.to_owned(), uuid.clone()));
        effects.push(Effect::RemoveVm {
            node_id: node_id.to_owned(),
            uuid: uuid.clone(),
        });
        effects.push(Effect::Journal(Entry {
            uuid,
            name: vm.name.into(),
            state: vm.state.into(),
            detail: "node revoked".into(),
            ..entry(now, node_id, EntryType::Vanished, "vanished")
        }));
    }
    inv.stats_windows.remove(node_id);
    if inv.nodes.remove(node_id).is_some() {
        effects.push(Effect::RemoveNode {
            node_id: node_id.to_owned(),
        });
    }
    effects
}

/// The journal entry of an enrollment change (`node`/`enrolled` or `node`/`revoked`).
pub fn enrollment_entry(node_id: &str, state: &'static str, now: u64) -> Vec<Effect> {
    vec![
        Effect::Journal(entry(now, node_id, EntryType::Node, state)),
        Effect::EnrollmentJournaled {
            node_id: node_id.to_owned(),
            state,
        },
    ]
}

/// Records a message's arrival on its node row: a new boot, the sequence and any gap, and the
/// node coming up.
fn record_arrival(
    node: &mut Node,
    admission: Admission,
    payload: &Payload,
    now: u64,
    rules: &Rules,
    out: &mut Outcome,
) {
    if admission == Admission::NewBoot {
        let mut e = entry(now, &node.node_id, EntryType::Node, "restarted");
        e.detail.clone_from(&payload.boot);
        out.effects.push(Effect::Journal(e));
        let old = std::mem::replace(&mut node.boot, "".into());
        supersede(node, old.to_string(), now, rules.max_message_age_ms);
    }
    let lost = match admission {
        Admission::Next { lost } => lost,
        Admission::NewNode | Admission::NewBoot => {
            set_shared(&mut node.boot, &payload.boot);
            node.boot_ts = payload.boot_ts;
            // Messages 1..seq of a new boot that never arrived are lost too.
            payload.seq.saturating_sub(1)
        }
    };
    node.last_seq = payload.seq;
    node.last_seen = now;
    if lost > 0 {
        node.gaps += 1;
        // Saturating at what the store keeps exactly (2^63 − 1): a node sending seq jumps of
        // nearly that, boot after boot, neither wraps nor crashes the count.
        node.lost = node
            .lost
            .saturating_add(lost)
            .min(vmwatch_common::protocol::bounds::MAX_INT);
        let mut e = entry(now, &node.node_id, EntryType::Gap, "gap");
        e.detail = lost.to_string();
        out.effects.push(Effect::Journal(e));
        out.gap = Some(lost);
    }
    if !node.up && !matches!(payload.body, Body::Bye(_)) {
        node.up = true;
        out.effects.push(Effect::Journal(entry(
            now,
            &node.node_id,
            EntryType::Node,
            "up",
        )));
    }
}

/// What a message says about its node itself: libvirt up or down, the counts and versions, the
/// agent's counters, a `bye`.
fn node_facts(node: &mut Node, body: &Body, now: u64, out: &mut Outcome) {
    match body {
        Body::Heartbeat(Heartbeat {
            libvirt,
            domains,
            version,
            agent,
            ..
        }) => {
            set_libvirt(node, out, now, libvirt == "up");
            node.domains = *domains;
            set_shared(&mut node.version, version);
            out.agent = Some(*agent);
        }
        Body::Bye(bye) => {
            if node.up {
                node.up = false;
                let mut e = entry(now, &node.node_id, EntryType::Node, "down");
                e.detail = format!("bye: {}", bye.reason);
                out.effects.push(Effect::Journal(e));
            }
        }
        Body::Snapshot(s) => {
            set_libvirt(node, out, now, true);
            node.domains = s.domains.len() as u64;
            set_shared(&mut node.hostname, &s.hostname);
            set_shared(&mut node.libvirt_version, &s.libvirt_version);
        }
        Body::Event(_) => set_libvirt(node, out, now, true),
        Body::Stats(_) => {}
    }
}

/// Replaces a shared string only when it changed (a heartbeat repeats its version).
fn set_shared(slot: &mut Arc<str>, value: &str) {
    if **slot != *value {
        *slot = value.into();
    }
}

fn new_node(node_id: &str, now: u64) -> Node {
    Node {
        node_id: node_id.into(),
        up: false,
        libvirt_up: false,
        first_seen: now,
        last_seen: now,
        boot: "".into(),
        boot_ts: 0,
        last_seq: 0,
        version: "".into(),
        hostname: "".into(),
        libvirt_version: "".into(),
        domains: 0,
        gaps: 0,
        lost: 0,
        libvirt_down_since: 0,
        superseded: Vec::new(),
    }
}

/// Remembers a boot id the node left behind, so a message of it is refused as a replay: for as
/// long as such a message could still be accepted by age, and at most [`MAX_SUPERSEDED`].
fn supersede(node: &mut Node, old: String, now: u64, max_message_age_ms: u64) {
    node.superseded.push((old, now));
    node.superseded
        .retain(|(_, at)| now.saturating_sub(*at) <= max_message_age_ms);
    let excess = node.superseded.len().saturating_sub(MAX_SUPERSEDED);
    node.superseded.drain(..excess);
}

fn set_libvirt(node: &mut Node, out: &mut Outcome, now: u64, up: bool) {
    if node.libvirt_up != up {
        node.libvirt_up = up;
        node.libvirt_down_since = if up { 0 } else { now };
        let event = if up { "libvirt-up" } else { "libvirt-down" };
        out.effects.push(Effect::Journal(entry(
            now,
            &node.node_id,
            EntryType::Node,
            event,
        )));
    }
}

fn apply_snapshot(vms: &mut VmRows, node_id: &Arc<str>, s: Snapshot, now: u64, out: &mut Outcome) {
    let listed: std::collections::HashSet<&str> =
        s.domains.iter().map(|d| d.uuid.as_str()).collect();
    for vm in vms.take_unless(|vm| listed.contains(&*vm.uuid)) {
        out.effects.push(Effect::RemoveVm {
            node_id: node_id.to_string(),
            uuid: vm.uuid.to_string(),
        });
        out.effects.push(Effect::Journal(Entry {
            uuid: vm.uuid.to_string(),
            name: vm.name.into(),
            state: vm.state.into(),
            ..entry(now, node_id, EntryType::Vanished, "vanished")
        }));
    }
    for d in s.domains {
        let old = vms.get(&d.uuid);
        let (detail, changed_state) = match old {
            None => ("new", true),
            Some(vm) if vm.state == UNKNOWN => ("known", true),
            Some(vm) if vm.state != d.state => ("changed", true),
            Some(vm) if vm.name != d.name || vm.reason != d.reason => ("", false),
            Some(_) => continue,
        };
        let state_since = match old {
            Some(vm) if !changed_state => vm.state_since,
            _ => now,
        };
        let (usage, duplicate) = old.map(|vm| (vm.usage, vm.duplicate)).unwrap_or_default();
        // A known row keeps its shared uuid; a new one allocates it once.
        let uuid = old.map_or_else(|| Arc::from(d.uuid.as_str()), |vm| vm.uuid.clone());
        let vm = Vm {
            node_id: node_id.clone(),
            uuid,
            name: d.name.as_str().into(),
            state: d.state.as_str().into(),
            reason: d.reason.as_str().into(),
            state_since,
            updated_at: now,
            usage,
            duplicate,
            unknown: None,
        };
        if changed_state {
            // The snapshot found a change no event told us about (or a domain not seen before).
            out.effects.push(Effect::Journal(Entry {
                uuid: d.uuid,
                name: d.name,
                detail: detail.to_owned(),
                state: d.state,
                ..entry(now, node_id, EntryType::Lifecycle, "snapshot")
            }));
        }
        out.effects.push(Effect::UpsertVm(vm.clone()));
        vms.insert(vm);
    }
}

fn apply_event(vms: &mut VmRows, node_id: &Arc<str>, e: DomainEvent, now: u64, out: &mut Outcome) {
    // Undefining a running domain only makes it transient: the row goes only when inactive.
    if e.event == "undefined" && e.state == "shutoff" {
        let removed = vms.remove(&e.uuid).map(|vm| vm.uuid);
        out.effects
            .push(Effect::Journal(event_entry(node_id, now, e)));
        if let Some(uuid) = removed {
            out.effects.push(Effect::RemoveVm {
                node_id: node_id.to_string(),
                uuid: uuid.to_string(),
            });
        }
        return;
    }
    let old = vms.get(&e.uuid);
    let state_since = match old {
        Some(vm) if vm.state == e.state => vm.state_since,
        _ => e.event_ts,
    };
    let (usage, duplicate) = old.map(|vm| (vm.usage, vm.duplicate)).unwrap_or_default();
    // A known row keeps its shared uuid; a new one allocates it once.
    let uuid = old.map_or_else(|| Arc::from(e.uuid.as_str()), |vm| vm.uuid.clone());
    let vm = Vm {
        node_id: node_id.clone(),
        uuid,
        name: e.name.as_str().into(),
        state: e.state.as_str().into(),
        reason: e.reason.as_str().into(),
        state_since,
        updated_at: now,
        usage,
        duplicate,
        unknown: None,
    };
    out.effects
        .push(Effect::Journal(event_entry(node_id, now, e)));
    out.effects.push(Effect::UpsertVm(vm.clone()));
    vms.insert(vm);
}

/// The `lifecycle` journal entry of a domain event, as the node reported it.
fn event_entry(node_id: &str, now: u64, e: DomainEvent) -> Entry {
    Entry {
        received_at: now,
        event_ts: e.event_ts,
        node_id: node_id.to_owned(),
        uuid: e.uuid,
        name: e.name,
        kind: EntryType::Lifecycle,
        event: e.event,
        detail: e.detail,
        state: e.state,
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_stats(
    vms: &mut VmRows,
    pending: &mut HashMap<(String, String), crate::activity::Point>,
    node_id: &str,
    stats: Stats,
    ts: u64,
    now: u64,
    rules: &Rules,
    out: &mut Outcome,
) {
    let interval_ms = stats.interval_s.saturating_mul(1000);
    for d in stats.domains {
        // Stats for a domain the master has no row for yet wait for the snapshot that adds it.
        let Some(vm) = vms.get_mut(&d.uuid) else {
            continue;
        };
        let sample = idle::Sample {
            ts,
            tx_pkts: d.tx_pkts,
            wr_reqs: d.wr_reqs,
            rx_pkts: d.rx_pkts,
            rd_reqs: d.rd_reqs,
            cpu_time_ns: d.cpu_time_ns,
            bytes: Some(idle::ByteCounters {
                tx: d.tx_bytes,
                rx: d.rx_bytes,
                rd: d.rd_bytes,
                wr: d.wr_bytes,
            }),
        };
        // Judged only when both the row (events) and the sample say running.
        let running = vm.state == "running" && d.state == "running";
        let observation = idle::Observation {
            sample,
            nics: d.nics,
            disks: d.disks,
            running,
        };
        let cfg = idle::IdleConfig {
            interval_ms,
            idle_windows: rules.idle_windows,
            tx_packets_max: rules.idle_tx_packets_max,
            wr_reqs_max: rules.idle_wr_reqs_max,
        };
        let prev = vm.usage.sample;
        let changes = idle::observe(&mut vm.usage, observation, cfg, now);
        vm.updated_at = now;
        if let Some(point) = prev.and_then(|p| {
            crate::activity::point(&p, &sample, vm.usage.net.idle, vm.usage.disk.idle)
        }) {
            // One point per `activity_min_window`: finer windows merge first (sums kept).
            let key = (node_id.to_string(), vm.uuid.to_string());
            let merged = match pending.remove(&key) {
                Some(acc) => crate::activity::merge(&acc, &point),
                None => point,
            };
            if merged.window_ms >= rules.activity_min_window_ms {
                out.effects.push(Effect::Activity {
                    node_id: node_id.to_string(),
                    uuid: vm.uuid.to_string(),
                    point: merged,
                });
            } else {
                pending.insert(key, merged);
            }
        }
        for c in changes {
            let kind = if c.idle {
                EntryType::Idle
            } else {
                EntryType::Active
            };
            let detail = idle_detail(&c, stats.interval_s);
            out.effects.push(Effect::Journal(Entry {
                uuid: vm.uuid.to_string(),
                name: vm.name.to_string(),
                detail,
                state: vm.state.to_string(),
                ..entry(now, node_id, kind, c.resource)
            }));
        }
        out.effects.push(Effect::UpsertVm(vm.clone()));
    }
}

/// The `detail` of an `idle`/`active` journal entry: the window, the last delta and the
/// threshold that decided (docs/API.md).
fn idle_detail(c: &idle::Change, interval_s: u64) -> String {
    let counter = if c.resource == "net" {
        "tx_pkts"
    } else {
        "wr_reqs"
    };
    match (c.idle, c.delta) {
        (true, delta) => format!(
            "{} quiet window(s) of {interval_s} s; {counter} +{} in the last, threshold {} per window",
            c.windows,
            delta.unwrap_or(0),
            c.threshold
        ),
        (false, Some(delta)) => format!(
            "activity in the last window of {interval_s} s: {counter} +{delta}, threshold {} per window",
            c.threshold
        ),
        (false, None) => format!("no {} any more: cannot be judged", if c.resource == "net" { "interface" } else { "disk" }),
    }
}

/// Keeps only the last write of each node row and each VM row, so a batch touching the same
/// rows many times writes each once. Journal entries all stay, in order. Correct because every
/// row write is a whole-row replacement or a removal: the last one is the row's final state.
pub fn coalesce(mut effects: Vec<Effect>) -> Vec<Effect> {
    use std::collections::HashSet;
    // Keys borrow from the effects: nothing is allocated per effect.
    let mut seen_nodes: HashSet<&str> = HashSet::new();
    let mut seen_vms: HashSet<(&str, &str)> = HashSet::new();
    let mut keep = vec![true; effects.len()];
    for (i, e) in effects.iter().enumerate().rev() {
        keep[i] = match e {
            Effect::UpsertNode(n) => seen_nodes.insert(&n.node_id),
            Effect::UpsertVm(vm) => seen_vms.insert((&vm.node_id, &vm.uuid)),
            Effect::RemoveVm { node_id, uuid } => seen_vms.insert((node_id, uuid)),
            Effect::RemoveNode { node_id } => seen_nodes.insert(node_id),
            Effect::Journal(_) | Effect::Activity { .. } | Effect::EnrollmentJournaled { .. } => {
                true
            }
        };
    }
    // In place: only the kept effects move, once each.
    let mut keep = keep.into_iter();
    effects.retain(|_| keep.next().unwrap_or(true));
    effects
}

/// Marks down every node silent for longer than `node_timeout`, and makes unknown every VM row
/// of a node that is down or whose libvirt has been down longer than `node_timeout`. `started_at`
/// is when this master started: a node is given a full timeout after a master restart before it
/// is judged.
///
/// Stops after the node that brings the effects to `budget` (a row marked unknown is two):
/// the nodes left are judged by the next call. A whole fleet falling silent at once (10,000
/// nodes × 50 VMs) was a million effects decided in one go, 680 MB of the master's memory and
/// one transaction.
pub fn check_liveness(
    inv: &mut Inventory,
    rules: &Rules,
    now: u64,
    started_at: u64,
    budget: usize,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    for node in inv.nodes.values_mut() {
        if effects.len() >= budget {
            break;
        }
        if node.up && now.saturating_sub(node.last_seen.max(started_at)) > rules.node_timeout_ms {
            node.up = false;
            let mut e = entry(now, &node.node_id, EntryType::Node, "down");
            e.detail = "timeout".into();
            effects.push(Effect::Journal(e));
            effects.push(Effect::UpsertNode(node.clone()));
        }
        let reason = if !node.up {
            "node-down"
        } else if !node.libvirt_up
            && node.libvirt_down_since > 0
            && now.saturating_sub(node.libvirt_down_since.max(started_at)) > rules.node_timeout_ms
        {
            "libvirt-down"
        } else {
            continue;
        };
        if let Some(vms) = inv.vms.get_mut(&*node.node_id) {
            mark_unknown(vms, &node.node_id, now, reason, &mut effects);
        }
    }
    effects
}

/// Makes every row of one node read `unknown` (rows already unknown are left as they are):
/// the state last seen is kept in `last_state`, and one `lifecycle`/`unknown` journal entry per
/// VM tells the panel. The node's next snapshot puts every row back to what libvirt says.
fn mark_unknown(
    vms: &mut VmRows,
    node_id: &str,
    now: u64,
    reason: &str,
    effects: &mut Vec<Effect>,
) {
    for vm in vms.values_mut().filter(|vm| vm.state != UNKNOWN) {
        vm.unknown = Some(Box::new(Unknown {
            last_state: Some(std::mem::replace(&mut vm.state, UNKNOWN.into())),
            since: Some(now),
            reason: Some(reason.to_owned()),
        }));
        vm.state_since = now;
        vm.updated_at = now;
        effects.push(Effect::Journal(Entry {
            uuid: vm.uuid.to_string(),
            name: vm.name.to_string(),
            detail: reason.to_owned(),
            state: UNKNOWN.to_owned(),
            ..entry(now, node_id, EntryType::Lifecycle, UNKNOWN)
        }));
        effects.push(Effect::UpsertVm(vm.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmwatch_common::protocol::{authenticate, encode, Bye, DomainState, NodeId, Payload};

    const KEY: &[u8] = b"0123456789abcdef";
    const RULES: Rules = Rules {
        max_nodes: 3,
        max_clock_skew_ms: 300_000,
        max_message_age_ms: 3_600_000,
        node_timeout_ms: 90_000,
        idle_windows: 1,
        idle_tx_packets_max: 0,
        idle_wr_reqs_max: 0,
        duplicate_grace_ms: 60_000,
        max_vms_per_node: 4096,
        min_stats_interval_ms: 1_000,
        activity_min_window_ms: 0,
    };
    const NOW: u64 = 1_800_000_000_000;

    fn msg(node: &str, boot: &str, boot_ts: u64, seq: u64, ts: u64, body: Body) -> Authenticated {
        let frames = encode(
            KEY,
            &NodeId::parse(node).unwrap(),
            &Payload {
                boot: boot.into(),
                boot_ts,
                seq,
                ts,
                body,
            },
        );
        authenticate(&frames, |_| Some(KEY)).unwrap()
    }

    fn hb(up: &str) -> Body {
        Body::Heartbeat(Heartbeat {
            libvirt: up.into(),
            domains: 0,
            version: "0.1.0".into(),
            uptime_s: 1,
            agent: Default::default(),
        })
    }

    fn snap(domains: &[(&str, &str)]) -> Body {
        Body::Snapshot(Snapshot {
            domains: domains
                .iter()
                .map(|(u, s)| DomainState {
                    uuid: u.to_string(),
                    name: format!("vm-{u}"),
                    state: s.to_string(),
                    reason: "unknown".into(),
                })
                .collect(),
            hostname: "h".into(),
            libvirt_version: "9.0.0".into(),
        })
    }

    fn ev(uuid: &str, event: &str, state: &str) -> Body {
        Body::Event(DomainEvent {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            event: event.into(),
            detail: "x".into(),
            state: state.into(),
            reason: "unknown".into(),
            event_ts: NOW - 5,
        })
    }

    fn journal(o: &Outcome) -> Vec<(EntryType, String, String)> {
        o.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(j) => Some((j.kind, j.event.clone(), j.detail.clone())),
                _ => None,
            })
            .collect()
    }

    fn feed(inv: &mut Inventory, seq: u64, body: Body) -> Result<Outcome, Reject> {
        handle(inv, &RULES, NOW, msg("hv1", "b1", 100, seq, NOW, body)).map_err(|r| r.reason)
    }

    /// The shell counts and logs from the outcome alone: who sent it, what kind, when, the
    /// agent's counters, and which VM rows the writes touch.
    #[test]
    fn an_outcome_says_what_the_shell_reports() {
        let mut inv = Inventory::default();
        let mut beat = hb("up");
        if let Body::Heartbeat(h) = &mut beat {
            h.agent.sent = 7;
        }
        let o = handle(
            &mut inv,
            &RULES,
            NOW,
            msg("hv1", "b1", 100, 3, NOW - 40, beat),
        )
        .unwrap();
        assert_eq!(
            (o.node_id.as_str(), o.kind, o.ts),
            ("hv1", "heartbeat", NOW - 40)
        );
        assert_eq!(o.agent.map(|a| a.sent), Some(7));
        assert_eq!(o.gap, Some(2));
        let o = feed(&mut inv, 4, snap(&[("a", "running")])).unwrap();
        assert_eq!(o.agent, None);
        assert_eq!(
            vm_changes(&o.effects),
            vec![VmChange {
                uuid: "a".into(),
                state: Some("running".into())
            }]
        );
        let o = feed(&mut inv, 5, snap(&[])).unwrap();
        assert_eq!(
            vm_changes(&o.effects),
            vec![VmChange {
                uuid: "a".into(),
                state: None
            }]
        );
        let refused = handle(
            &mut inv,
            &RULES,
            NOW,
            msg("hv1", "b1", 100, 5, NOW, ev("a", "x", "y")),
        )
        .unwrap_err();
        assert_eq!(
            refused,
            Refused {
                reason: Reject::Replay,
                node_id: "hv1".into(),
                kind: "event"
            }
        );
    }

    #[test]
    fn admission_order_and_reasons() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, hb("up")).unwrap();
        // Ahead by more than the skew; older than max_message_age. A message queued for an
        // hour at the node (master away) is still accepted.
        let at = |ts| msg("hv1", "b1", 100, 2, ts, hb("up"));
        assert_eq!(
            handle(&mut inv, &RULES, NOW, at(NOW + 300_001))
                .unwrap_err()
                .reason,
            Reject::ClockSkew
        );
        assert_eq!(
            handle(&mut inv, &RULES, NOW, at(NOW - 3_600_001))
                .unwrap_err()
                .reason,
            Reject::TooOld
        );
        // Replay of seq 1 and a duplicate.
        assert_eq!(feed(&mut inv, 1, hb("up")).unwrap_err(), Reject::Replay);
        feed(&mut inv, 2, hb("up")).unwrap();
        assert_eq!(feed(&mut inv, 2, hb("up")).unwrap_err(), Reject::Replay);
        // A new boot is accepted; then the old boot is stale.
        handle(
            &mut inv,
            &RULES,
            NOW,
            msg("hv1", "b2", 200, 1, NOW, hb("up")),
        )
        .unwrap();
        assert_eq!(feed(&mut inv, 3, hb("up")).unwrap_err(), Reject::StaleBoot);
        // A rejected message changed nothing.
        assert_eq!(&*inv.nodes["hv1"].boot, "b2");
        assert_eq!(inv.nodes["hv1"].last_seq, 1);
        // The clock was stepped back an hour before the next restart: boot_ts is never
        // compared across boots, so the new boot is not locked out.
        handle(
            &mut inv,
            &RULES,
            NOW,
            msg("hv1", "b3", 50, 1, NOW, hb("up")),
        )
        .unwrap();
        // A message 59 minutes old of the current boot (queued while the master was away).
        handle(
            &mut inv,
            &RULES,
            NOW,
            msg("hv1", "b3", 1, 2, NOW - 3_540_000, hb("up")),
        )
        .unwrap();
        assert_eq!(
            handle(
                &mut inv,
                &RULES,
                NOW,
                msg("hv1", "b2", 200, 9, NOW, hb("up"))
            )
            .unwrap_err()
            .reason,
            Reject::StaleBoot
        );
    }

    fn check_liveness_all(
        inv: &mut Inventory,
        rules: &Rules,
        now: u64,
        started_at: u64,
    ) -> Vec<Effect> {
        check_liveness(inv, rules, now, started_at, usize::MAX)
    }

    /// A fleet falling silent is judged a budget at a time: each call stops after the node
    /// that reaches it, the next call goes on, and in the end every row is unknown once.
    #[test]
    fn liveness_is_judged_a_budget_at_a_time() {
        let mut inv = Inventory::default();
        let rows = [
            ("u1", "running"),
            ("u2", "running"),
            ("u3", "paused"),
            ("u4", "shutoff"),
        ];
        for node in ["hv1", "hv2", "hv3"] {
            let vms: Vec<(String, &str)> = rows
                .iter()
                .map(|(u, s)| (format!("{node}-{u}"), *s))
                .collect();
            let vms: Vec<(&str, &str)> = vms.iter().map(|(u, s)| (u.as_str(), *s)).collect();
            handle(
                &mut inv,
                &RULES,
                NOW,
                msg(node, "b1", 100, 1, NOW, snap(&vms)),
            )
            .unwrap();
        }
        let later = NOW + RULES.node_timeout_ms + 1;
        let mut calls = Vec::new();
        loop {
            let effects = check_liveness(&mut inv, &RULES, later, NOW, 2);
            if effects.is_empty() {
                break;
            }
            calls.push(effects);
        }
        // One node a call: its `down` entry and row, and each VM's entry and row.
        let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 10]);
        let unknown = calls
            .iter()
            .flatten()
            .filter(|e| matches!(e, Effect::UpsertVm(vm) if vm.state == UNKNOWN))
            .count();
        assert_eq!(unknown, 12);
        assert!(inv.nodes.values().all(|n| !n.up));
        assert!(inv
            .vms
            .values()
            .flat_map(|r| r.values())
            .all(|vm| vm.state == UNKNOWN));
    }

    #[test]
    fn unknown_while_node_down_or_libvirt_down_then_known_again() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, snap(&[("u1", "running"), ("u2", "shutoff")])).unwrap();
        // Silent for longer than node_timeout: every row reads unknown, one entry per VM.
        let later = NOW + RULES.node_timeout_ms + 1;
        let effects = check_liveness_all(&mut inv, &RULES, later, NOW);
        let unknown: Vec<_> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(j) if j.event == UNKNOWN => {
                    Some((j.uuid.as_str(), j.detail.as_str()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(unknown, [("u1", "node-down"), ("u2", "node-down")]);
        let u1 = &inv.vms["hv1"]["u1"];
        assert_eq!(
            (
                u1.state.as_str(),
                u1.last_state(),
                u1.unknown_since(),
                u1.unknown_reason()
            ),
            (UNKNOWN, Some("running"), Some(later), Some("node-down"))
        );
        // Judged again: nothing more.
        assert!(check_liveness_all(&mut inv, &RULES, later + 1000, NOW).is_empty());
        // The node's next snapshot puts every row back.
        let o = handle(
            &mut inv,
            &RULES,
            later,
            msg(
                "hv1",
                "b1",
                100,
                2,
                later,
                snap(&[("u1", "running"), ("u2", "shutoff")]),
            ),
        )
        .unwrap();
        assert_eq!(inv.vms["hv1"]["u1"].state, "running");
        assert_eq!(inv.vms["hv1"]["u1"].last_state(), None);
        assert!(journal(&o).contains(&(EntryType::Lifecycle, "snapshot".into(), "known".into())));
        // libvirt down: unknown only once it has been down longer than node_timeout.
        let t = later + 1000;
        handle(&mut inv, &RULES, t, msg("hv1", "b1", 100, 3, t, hb("down"))).unwrap();
        assert!(check_liveness_all(&mut inv, &RULES, t + RULES.node_timeout_ms, NOW).is_empty());
        handle(
            &mut inv,
            &RULES,
            t + 60_000,
            msg("hv1", "b1", 100, 4, t + 60_000, hb("down")),
        )
        .unwrap();
        check_liveness_all(&mut inv, &RULES, t + RULES.node_timeout_ms + 1, NOW);
        assert_eq!(inv.vms["hv1"]["u2"].unknown_reason(), Some("libvirt-down"));
        // A bye makes them unknown at once.
        let mut inv = Inventory::default();
        feed(&mut inv, 1, snap(&[("u1", "running")])).unwrap();
        feed(
            &mut inv,
            2,
            Body::Bye(Bye {
                reason: "sigterm".into(),
            }),
        )
        .unwrap();
        assert_eq!(inv.vms["hv1"]["u1"].state, UNKNOWN);
    }

    #[test]
    fn seq_jump_is_a_gap() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, hb("up")).unwrap();
        let o = feed(&mut inv, 5, hb("up")).unwrap();
        assert_eq!(o.gap, Some(3));
        assert!(journal(&o).contains(&(EntryType::Gap, "gap".into(), "3".into())));
        assert_eq!((inv.nodes["hv1"].gaps, inv.nodes["hv1"].lost), (1, 3));
        assert_eq!(feed(&mut inv, 6, hb("up")).unwrap().gap, None);
    }

    #[test]
    fn first_message_of_a_late_joiner_counts_lost_messages() {
        let mut inv = Inventory::default();
        assert_eq!(feed(&mut inv, 4, hb("up")).unwrap().gap, Some(3));
    }

    #[test]
    fn snapshot_is_authoritative() {
        let mut inv = Inventory::default();
        let o = feed(&mut inv, 1, snap(&[("a", "running"), ("b", "shutoff")])).unwrap();
        assert_eq!(
            journal(&o),
            vec![
                (EntryType::Node, "up".into(), "".into()),
                (EntryType::Node, "libvirt-up".into(), "".into()),
                (EntryType::Lifecycle, "snapshot".into(), "new".into()),
                (EntryType::Lifecycle, "snapshot".into(), "new".into()),
            ]
        );
        // Same snapshot again: nothing to journal.
        assert!(
            journal(&feed(&mut inv, 2, snap(&[("a", "running"), ("b", "shutoff")])).unwrap())
                .is_empty()
        );
        // b vanished, a changed, c appeared.
        let o = feed(&mut inv, 3, snap(&[("a", "paused"), ("c", "running")])).unwrap();
        let j = journal(&o);
        assert!(j.contains(&(EntryType::Vanished, "vanished".into(), "".into())));
        assert!(j.contains(&(EntryType::Lifecycle, "snapshot".into(), "changed".into())));
        assert!(o.effects.contains(&Effect::RemoveVm {
            node_id: "hv1".into(),
            uuid: "b".into()
        }));
        let vms = &inv.vms["hv1"];
        assert_eq!(
            vms.values().map(|v| &*v.uuid).collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(vms["a"].state, "paused");
    }

    #[test]
    fn events_update_rows_and_undefine_removes() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, ev("a", "defined", "shutoff")).unwrap();
        feed(&mut inv, 2, ev("a", "started", "running")).unwrap();
        assert_eq!(inv.vms["hv1"]["a"].state, "running");
        assert_eq!(inv.vms["hv1"]["a"].state_since, NOW - 5);
        // Undefining a running domain leaves it (transient) in place.
        feed(&mut inv, 3, ev("a", "undefined", "running")).unwrap();
        assert!(inv.vms["hv1"].contains_key("a"));
        feed(&mut inv, 4, ev("a", "stopped", "shutoff")).unwrap();
        let o = feed(&mut inv, 5, ev("a", "undefined", "shutoff")).unwrap();
        assert!(o.effects.contains(&Effect::RemoveVm {
            node_id: "hv1".into(),
            uuid: "a".into()
        }));
        assert!(inv.vms["hv1"].is_empty());
    }

    #[test]
    fn libvirt_down_and_up_are_journaled_once() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, hb("up")).unwrap();
        let o = feed(&mut inv, 2, hb("down")).unwrap();
        assert_eq!(
            journal(&o),
            vec![(EntryType::Node, "libvirt-down".into(), "".into())]
        );
        assert!(!inv.nodes["hv1"].libvirt_up);
        assert!(journal(&feed(&mut inv, 3, hb("down")).unwrap()).is_empty());
        let o = feed(&mut inv, 4, snap(&[])).unwrap();
        assert_eq!(
            journal(&o),
            vec![(EntryType::Node, "libvirt-up".into(), "".into())]
        );
    }

    #[test]
    fn liveness_timeout_bye_and_return() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, hb("up")).unwrap();
        assert!(check_liveness_all(&mut inv, &RULES, NOW + 90_000, 0).is_empty());
        let e = check_liveness_all(&mut inv, &RULES, NOW + 90_001, 0);
        assert!(matches!(&e[0], Effect::Journal(j) if j.event == "down" && j.detail == "timeout"));
        assert!(!inv.nodes["hv1"].up);
        assert!(
            check_liveness_all(&mut inv, &RULES, NOW + 200_000, 0).is_empty(),
            "down only once"
        );
        let o = handle(
            &mut inv,
            &RULES,
            NOW + 100_000,
            msg("hv1", "b1", 100, 2, NOW + 100_000, hb("up")),
        )
        .unwrap();
        assert_eq!(journal(&o), vec![(EntryType::Node, "up".into(), "".into())]);
        let o = handle(
            &mut inv,
            &RULES,
            NOW + 100_000,
            msg(
                "hv1",
                "b1",
                100,
                3,
                NOW + 100_000,
                Body::Bye(Bye {
                    reason: "shutdown".into(),
                }),
            ),
        )
        .unwrap();
        assert_eq!(
            journal(&o),
            vec![(EntryType::Node, "down".into(), "bye: shutdown".into())]
        );
    }

    fn stats(uuid: &str, state: &str, tx: u64, wr: u64) -> Body {
        Body::Stats(Stats {
            interval_s: 60,
            domains: vec![vmwatch_common::protocol::DomainStats {
                uuid: uuid.into(),
                state: state.into(),
                tx_pkts: tx,
                wr_reqs: wr,
                nics: 1,
                disks: 1,
                ..Default::default()
            }],
        })
    }

    #[test]
    fn stats_flag_idle_and_active_with_journal() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, snap(&[("a", "running")])).unwrap();
        let at = |seq: u64, body: Body| {
            let t = NOW + seq * 60_000;
            (t, msg("hv1", "b1", 100, seq, t, body))
        };
        let (t, m) = at(2, stats("a", "running", 10, 10));
        assert!(
            journal(&handle(&mut inv, &RULES, t, m).unwrap()).is_empty(),
            "first sample: unknown"
        );
        let (t, m) = at(3, stats("a", "running", 10, 15));
        let j = journal(&handle(&mut inv, &RULES, t, m).unwrap());
        assert_eq!(
            j,
            vec![(
                EntryType::Idle,
                "net".into(),
                "1 quiet window(s) of 60 s; tx_pkts +0 in the last, threshold 0 per window".into()
            )]
        );
        assert!(inv.vms["hv1"]["a"].usage.net.idle);
        let (t, m) = at(4, stats("a", "running", 11, 15));
        let j = journal(&handle(&mut inv, &RULES, t, m).unwrap());
        assert_eq!(
            j,
            vec![
                (
                    EntryType::Active,
                    "net".into(),
                    "activity in the last window of 60 s: tx_pkts +1, threshold 0 per window"
                        .into()
                ),
                (
                    EntryType::Idle,
                    "disk".into(),
                    "1 quiet window(s) of 60 s; wr_reqs +0 in the last, threshold 0 per window"
                        .into()
                )
            ]
        );
        // An event keeps the usage.
        feed_at(&mut inv, 5, ev("a", "suspended", "paused"));
        assert!(inv.vms["hv1"]["a"].usage.disk.idle);
    }

    fn feed_at(inv: &mut Inventory, seq: u64, body: Body) {
        let t = NOW + seq * 60_000;
        handle(inv, &RULES, t, msg("hv1", "b1", 100, seq, t, body)).unwrap();
    }

    #[test]
    fn coalesce_keeps_the_last_write_of_each_row_and_every_entry() {
        let mut inv = Inventory::default();
        let mut all = Vec::new();
        for (seq, body) in [
            (1, snap(&[("a", "running"), ("b", "running")])),
            (2, ev("a", "suspended", "paused")),
            (3, ev("a", "resumed", "running")),
            (4, ev("b", "stopped", "shutoff")),
            (5, ev("b", "undefined", "shutoff")),
        ] {
            all.extend(feed(&mut inv, seq, body).unwrap().effects);
        }
        let journal_before = all
            .iter()
            .filter(|e| matches!(e, Effect::Journal(_)))
            .count();
        let out = coalesce(all);
        assert_eq!(
            out.iter()
                .filter(|e| matches!(e, Effect::Journal(_)))
                .count(),
            journal_before
        );
        let rows: Vec<&Effect> = out
            .iter()
            .filter(|e| !matches!(e, Effect::Journal(_)))
            .collect();
        assert_eq!(
            rows.len(),
            3,
            "one node row, a's last upsert, b's removal: {rows:?}"
        );
        assert!(rows.iter().any(
            |e| matches!(e, Effect::UpsertVm(vm) if &*vm.uuid == "a" && vm.state == "running")
        ));
        assert!(rows
            .iter()
            .any(|e| matches!(e, Effect::RemoveVm { uuid, .. } if uuid == "b")));
    }

    #[test]
    fn master_restart_gives_nodes_a_full_timeout() {
        let mut inv = Inventory::default();
        feed(&mut inv, 1, hb("up")).unwrap();
        let restarted = NOW + 500_000;
        assert!(check_liveness_all(&mut inv, &RULES, restarted + 1_000, restarted).is_empty());
        assert_eq!(
            check_liveness_all(&mut inv, &RULES, restarted + 90_001, restarted).len(),
            2
        );
    }
}
