//! The duplicate rule (pure): one uuid active on two or more nodes for longer than
//! `duplicate_grace` flags every such row; the flags clear when at most one stays active.
//!
//! A live migration is not a second copy: the destination reads `paused` (reason `starting_up`,
//! then `migration`) while the source runs, for as long as the migration takes. An `unknown`
//! row (a host that cannot be seen) is not active either; when that node returns still running
//! the VM that meanwhile runs elsewhere (the zombie after an HA restart), it is flagged.

use std::collections::{BTreeSet, HashMap};

use crate::rules::{Effect, Entry, EntryType, Inventory, Vm};

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

/// Re-evaluates every uuid at `now`; returns the rows whose flag changed and their journal
/// entries. `dup_since` in the inventory remembers since when each uuid has been active twice.
pub fn check(inv: &mut Inventory, now: u64, grace_ms: u64) -> Vec<Effect> {
    let mut active: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for (node_id, vms) in &inv.vms {
        for vm in vms.values().filter(|vm| is_active(vm)) {
            active
                .entry(vm.uuid.as_str())
                .or_default()
                .insert(node_id.as_str());
        }
    }
    let multi: HashMap<String, Vec<String>> = active
        .into_iter()
        .filter(|(_, nodes)| nodes.len() >= 2)
        .map(|(uuid, nodes)| {
            (
                uuid.to_owned(),
                nodes.into_iter().map(str::to_owned).collect(),
            )
        })
        .collect();
    inv.dup_since.retain(|uuid, _| multi.contains_key(uuid));
    for uuid in multi.keys() {
        inv.dup_since.entry(uuid.clone()).or_insert(now);
    }
    let dup_since = &inv.dup_since;
    let mut effects = Vec::new();
    // Node order makes the journal order deterministic.
    let mut nodes: Vec<(
        &String,
        &mut std::collections::BTreeMap<String, crate::rules::Vm>,
    )> = inv.vms.iter_mut().collect();
    nodes.sort_by(|a, b| a.0.cmp(b.0));
    for (node_id, vms) in nodes {
        for vm in vms.values_mut() {
            let flagged = dup_since
                .get(&vm.uuid)
                .is_some_and(|since| now.saturating_sub(*since) > grace_ms)
                && is_active(vm);
            if vm.duplicate == flagged {
                continue;
            }
            vm.duplicate = flagged;
            let detail = match multi.get(&vm.uuid) {
                Some(nodes) => format!("active on {}", nodes.join(", ")),
                None => "active on one node at most".to_owned(),
            };
            effects.push(Effect::Journal(Entry {
                received_at: now,
                event_ts: now,
                node_id: node_id.clone(),
                uuid: vm.uuid.clone(),
                name: vm.name.clone(),
                kind: EntryType::Duplicate,
                event: if flagged { "flagged" } else { "cleared" }.to_owned(),
                detail,
                state: vm.state.clone(),
            }));
            effects.push(Effect::UpsertVm(vm.clone()));
        }
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(inv: &mut Inventory, node: &str, uuid: &str, state: &str) {
        let vm = Vm {
            node_id: node.into(),
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            state: state.into(),
            reason: "unknown".into(),
            state_since: 0,
            updated_at: 0,
            usage: Default::default(),
            duplicate: false,
            last_state: None,
            unknown_since: None,
            unknown_reason: None,
        };
        let old = inv
            .vms
            .get(node)
            .and_then(|m| m.get(uuid))
            .map(|v| v.duplicate)
            .unwrap_or(false);
        inv.vms.entry(node.into()).or_default().insert(
            uuid.into(),
            Vm {
                duplicate: old,
                ..vm
            },
        );
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
}
