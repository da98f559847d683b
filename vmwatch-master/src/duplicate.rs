//! The duplicate rule (pure): one uuid active on two or more nodes for longer than
//! `duplicate_grace` flags every such row; the flags clear when at most one stays active.
//!
//! A live migration is not a second copy: the destination reads `paused` (reason `starting_up`,
//! then `migration`) while the source runs, for as long as the migration takes. An `unknown`
//! row (a host that cannot be seen) is not active either; when that node returns still running
//! the VM that meanwhile runs elsewhere (the zombie after an HA restart), it is flagged.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::rows::VmRows;
use crate::rules::{Effect, Entry, EntryType, Inventory, Node, Vm};

/// Reasons of a `paused` copy that a migration is bringing in (or carrying out): not a second
/// copy, however long the migration takes.
pub const MIGRATION_REASONS: &[&str] = &["starting_up", "migration", "postcopy"];

/// Whether a row is a copy that holds its disks and identity: running, blocked, pmsuspended, or
/// paused for any reason but a migration. An `unknown` row (its host cannot be seen) is not.
pub fn is_active(vm: &Vm) -> bool {
    match vm.state.as_str() {
        "running" | "blocked" | "pmsuspended" => true,
        "paused" => !MIGRATION_REASONS.contains(&vm.reason.as_str()),
        _ => false,
    }
}

/// Which nodes hold a row of each uuid. Nearly every uuid is on one node: those are a map entry
/// of two shared strings (32 bytes; a small vector per uuid made it 48, 16 MB more at 500,000
/// rows), and only the uuids on two or more nodes have a sorted list.
#[derive(Debug, Default, Clone)]
struct Holders {
    /// The uuids on exactly one node, with it.
    sole: HashMap<Arc<str>, Arc<str>>,
    /// The uuids on two or more nodes, with them sorted.
    several: HashMap<Arc<str>, Vec<Arc<str>>>,
}

impl Holders {
    /// The nodes holding `uuid`, sorted.
    fn of(&self, uuid: &str) -> &[Arc<str>] {
        if let Some(nodes) = self.several.get(uuid) {
            return nodes;
        }
        self.sole.get(uuid).map_or(&[], std::slice::from_ref)
    }

    fn add(&mut self, uuid: &Arc<str>, node: Arc<str>) {
        if let Some(nodes) = self.several.get_mut(&**uuid) {
            if let Err(i) = nodes.binary_search(&node) {
                nodes.insert(i, node);
            }
            return;
        }
        match self.sole.get(&**uuid) {
            Some(held) if *held == node => {}
            Some(_) => {
                let Some((key, held)) = self.sole.remove_entry(&**uuid) else {
                    return;
                };
                let mut nodes = vec![held, node];
                nodes.sort();
                self.several.insert(key, nodes);
            }
            None => {
                self.sole.insert(uuid.clone(), node);
            }
        }
    }

    fn remove(&mut self, uuid: &str, node: &str) {
        if let Some(nodes) = self.several.get_mut(uuid) {
            if let Ok(i) = nodes.binary_search_by(|n| (**n).cmp(node)) {
                nodes.remove(i);
            }
            if nodes.len() < 2 {
                if let Some((key, mut nodes)) = self.several.remove_entry(uuid) {
                    if let Some(last) = nodes.pop() {
                        self.sole.insert(key, last);
                    }
                }
            }
            return;
        }
        if self.sole.get(uuid).is_some_and(|held| **held == *node) {
            self.sole.remove(uuid);
        }
    }

    fn uuids(&self) -> impl Iterator<Item = &Arc<str>> {
        self.sole.keys().chain(self.several.keys())
    }
}

/// Which nodes hold a row of each uuid, and the rows written since the last check: the rule
/// re-evaluates only the uuids of those rows and the uuids in their grace, never every row
/// (a scan of 500,000 rows a second was a third of an idle master's CPU).
#[derive(Debug, Default, Clone)]
pub struct Copies {
    /// The keys are the rows' own shared uuids (`Vm::uuid`: the row that first indexed the
    /// uuid; compared by text, so a later row's copy finds it), the nodes the node rows' own
    /// shared ids (`Node::node_id`): the index allocates no string of its own.
    by_uuid: Holders,
    /// (uuid, node) of every row written or removed since the last check.
    /// The row's own shared strings where an effect carries them (no allocation per write).
    touched: BTreeSet<(Arc<str>, Arc<str>)>,
    /// Whether `by_uuid` has been built from the whole inventory (the first check does it).
    built: bool,
}

impl Copies {
    /// Notes the rows `effects` write or remove (the core calls it for every batch).
    pub fn note(&mut self, effects: &[Effect]) {
        for e in effects {
            match e {
                Effect::UpsertVm(vm) => self.touch(vm.node_id.clone(), vm.uuid.clone()),
                Effect::RemoveVm { node_id, uuid } => {
                    if self.built {
                        self.touch(node_id.as_str().into(), uuid.as_str().into());
                    }
                }
                Effect::UpsertNode(_)
                | Effect::RemoveNode { .. }
                | Effect::EnrollmentJournaled { .. }
                | Effect::Journal(_)
                | Effect::Activity { .. } => {}
            }
        }
    }

    pub fn touch(&mut self, node_id: Arc<str>, uuid: Arc<str>) {
        if self.built {
            self.touched.insert((uuid, node_id));
        }
    }

    /// Brings `by_uuid` up to date; returns the uuids to re-evaluate (all of them the first
    /// time).
    fn refresh(
        &mut self,
        nodes: &HashMap<String, Node>,
        vms: &HashMap<String, VmRows>,
    ) -> BTreeSet<Arc<str>> {
        // A VM map without its node row does not happen (the rules insert both); a copy then.
        let shared = |node_id: &str| -> Arc<str> {
            nodes
                .get(node_id)
                .map_or_else(|| node_id.into(), |n| n.node_id.clone())
        };
        if !self.built {
            self.built = true;
            for (node_id, rows) in vms {
                let id = shared(node_id);
                for vm in rows.values() {
                    self.by_uuid.add(&vm.uuid, id.clone());
                }
            }
            return self.by_uuid.uuids().cloned().collect();
        }
        let mut uuids = BTreeSet::new();
        for (uuid, node_id) in std::mem::take(&mut self.touched) {
            let row = vms.get(&*node_id).and_then(|rows| rows.get(&uuid));
            // Kept sorted: node order makes the journal order deterministic.
            match row {
                Some(vm) => self.by_uuid.add(&vm.uuid, shared(&node_id)),
                None => self.by_uuid.remove(&uuid, &node_id),
            }
            uuids.insert(uuid);
        }
        uuids
    }
}

/// Re-evaluates at `now` the uuids whose rows changed since the last check and those within
/// their grace; returns the rows whose flag changed and their journal entries. `dup_since` in
/// the inventory remembers since when each uuid has been active twice.
pub fn check(inv: &mut Inventory, now: u64, grace_ms: u64) -> Vec<Effect> {
    let mut uuids = inv.copies.refresh(&inv.nodes, &inv.vms);
    uuids.extend(inv.dup_since.keys().cloned());
    let mut effects = Vec::new();
    for uuid in uuids {
        let nodes: &[Arc<str>] = inv.copies.by_uuid.of(&uuid);
        let active: Vec<&str> = nodes
            .iter()
            .map(|n| &**n)
            .filter(|n| {
                inv.vms
                    .get(*n)
                    .and_then(|rows| rows.get(&uuid))
                    .is_some_and(is_active)
            })
            .collect();
        if active.len() >= 2 {
            inv.dup_since.entry(uuid.clone()).or_insert(now);
        } else {
            inv.dup_since.remove(&uuid);
        }
        // Written only when a flag changes (most checks change none).
        // The nodes it is active on now, as API.md says: `active on hv1, hv2`, `active on hv1`,
        // or `active on no node`.
        let detail = || match active.as_slice() {
            [] => "active on no node".to_owned(),
            _ => {
                format!("active on {}", active.join(", "))
            }
        };
        let over_grace = inv
            .dup_since
            .get(&uuid)
            .is_some_and(|since| now.saturating_sub(*since) > grace_ms);
        for node_id in nodes {
            let Some(vm) = inv
                .vms
                .get_mut(&**node_id)
                .and_then(|rows| rows.get_mut(&uuid))
            else {
                continue;
            };
            let flagged = over_grace && is_active(vm);
            if vm.duplicate == flagged {
                continue;
            }
            vm.duplicate = flagged;
            effects.push(Effect::Journal(Entry {
                received_at: now,
                event_ts: now,
                node_id: node_id.to_string(),
                uuid: vm.uuid.to_string(),
                name: vm.name.to_string(),
                kind: EntryType::Duplicate,
                event: if flagged { "flagged" } else { "cleared" }.to_owned(),
                detail: detail(),
                state: vm.state.to_string(),
            }));
            effects.push(Effect::UpsertVm(vm.clone()));
        }
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn put(inv: &mut Inventory, node: &str, uuid: &str, state: &str) {
        let vm = Vm::for_test(node, uuid, state);
        let old = inv
            .vms
            .get(node)
            .and_then(|m| m.get(uuid))
            .map(|v| v.duplicate)
            .unwrap_or(false);
        inv.copies.touch(node.into(), uuid.into());
        inv.vms.entry(node.into()).or_default().insert(Vm {
            duplicate: old,
            ..vm
        });
    }

    fn flags(inv: &Inventory, uuid: &str) -> Vec<(String, bool)> {
        let mut v: Vec<_> = inv
            .vms
            .iter()
            .filter_map(|(n, m)| m.get(uuid).map(|vm| (n.clone(), vm.duplicate)))
            .collect();
        v.sort();
        v
    }

    fn events(effects: &[Effect]) -> Vec<(String, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Journal(j) => Some((j.node_id.clone(), j.event.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn flagged_after_grace_and_cleared() {
        let mut inv = Inventory::default();
        put(&mut inv, "hv1", "u", "running");
        put(&mut inv, "hv2", "u", "running");
        put(&mut inv, "hv3", "u", "shutoff");
        assert!(check(&mut inv, 1_000, 60_000).is_empty(), "first seen");
        assert!(
            check(&mut inv, 61_000, 60_000).is_empty(),
            "exactly the grace is not longer than it"
        );
        let e = check(&mut inv, 61_001, 60_000);
        assert_eq!(
            events(&e),
            [
                ("hv1".into(), "flagged".into()),
                ("hv2".into(), "flagged".into())
            ]
        );
        assert_eq!(
            flags(&inv, "u"),
            [
                ("hv1".into(), true),
                ("hv2".into(), true),
                ("hv3".into(), false)
            ]
        );
        assert!(check(&mut inv, 70_000, 60_000).is_empty(), "flagged once");
        put(&mut inv, "hv2", "u", "shutoff");
        let e = check(&mut inv, 71_000, 60_000);
        assert_eq!(
            events(&e),
            [
                ("hv1".into(), "cleared".into()),
                ("hv2".into(), "cleared".into())
            ]
        );
        assert!(inv.dup_since.is_empty());
    }

    #[test]
    fn short_migration_is_never_flagged() {
        let mut inv = Inventory::default();
        put(&mut inv, "src", "u", "running");
        assert!(check(&mut inv, 0, 60_000).is_empty());
        put(&mut inv, "dst", "u", "paused");
        assert!(check(&mut inv, 1_000, 60_000).is_empty());
        put(&mut inv, "src", "u", "paused");
        put(&mut inv, "dst", "u", "running");
        assert!(check(&mut inv, 20_000, 60_000).is_empty());
        put(&mut inv, "src", "u", "shutoff");
        assert!(check(&mut inv, 30_000, 60_000).is_empty());
        assert!(check(&mut inv, 200_000, 60_000).is_empty());
    }

    #[test]
    fn grace_restarts_after_a_clear() {
        let mut inv = Inventory::default();
        put(&mut inv, "a", "u", "running");
        put(&mut inv, "b", "u", "running");
        check(&mut inv, 0, 10);
        put(&mut inv, "b", "u", "shutoff");
        check(&mut inv, 5, 10);
        put(&mut inv, "b", "u", "running");
        assert!(
            check(&mut inv, 12, 10).is_empty(),
            "grace counts from the second start"
        );
        assert_eq!(events(&check(&mut inv, 30, 10)).len(), 2);
    }

    /// The index follows removed rows: a copy whose row goes (a vanished domain) clears the
    /// flags of the one left, and a uuid seen again later is indexed again.
    #[test]
    fn a_removed_copy_clears_the_flag_of_the_other() {
        let mut inv = Inventory::default();
        put(&mut inv, "a", "u", "running");
        put(&mut inv, "b", "u", "running");
        put(&mut inv, "c", "other", "running");
        check(&mut inv, 0, 10);
        assert_eq!(events(&check(&mut inv, 11, 10)).len(), 2);
        inv.vms.get_mut("b").unwrap().remove("u");
        inv.copies.touch("b".into(), "u".into());
        assert_eq!(
            events(&check(&mut inv, 12, 10)),
            [("a".into(), "cleared".into())]
        );
        assert!(inv.dup_since.is_empty());
        put(&mut inv, "c", "u", "running");
        check(&mut inv, 20, 10);
        assert_eq!(
            events(&check(&mut inv, 31, 10)),
            [
                ("a".into(), "flagged".into()),
                ("c".into(), "flagged".into())
            ]
        );
    }

    proptest::proptest! {
        /// The holder index answers as a map of sorted node sets does, under any sequence of
        /// adds and removals (a uuid moving between one holder and several included).
        #[test]
        fn holders_behave_as_sorted_sets(ops in proptest::collection::vec((proptest::bool::ANY, 0u8..4, 0u8..4), 0..300)) {
            let mut index = Holders::default();
            let mut model: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for (add, u, n) in ops {
                let (uuid, node) = (format!("u{u}"), format!("n{n}"));
                if add {
                    index.add(&Arc::from(uuid.as_str()), Arc::from(node.as_str()));
                    model.entry(uuid.clone()).or_default().insert(node);
                } else {
                    index.remove(&uuid, &node);
                    if let Some(set) = model.get_mut(&uuid) {
                        set.remove(&node);
                        if set.is_empty() {
                            model.remove(&uuid);
                        }
                    }
                }
                for u in 0..4 {
                    let uuid = format!("u{u}");
                    let got: Vec<String> = index.of(&uuid).iter().map(|n| n.to_string()).collect();
                    let want: Vec<String> = model.get(&uuid).map(|s| s.iter().cloned().collect()).unwrap_or_default();
                    proptest::prop_assert_eq!(got, want);
                    proptest::prop_assert_eq!(index.uuids().any(|u| **u == *uuid), model.contains_key(&uuid));
                }
                let mut uuids: Vec<String> = index.uuids().map(|u| u.to_string()).collect();
                uuids.sort();
                proptest::prop_assert!(uuids.iter().eq(model.keys()));
            }
        }
    }
}
