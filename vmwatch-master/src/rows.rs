//! One node's VM rows in memory, sorted by uuid (no I/O).
//!
//! A `BTreeMap<String, Vm>` held each uuid twice (key and row) and left its nodes about 40 %
//! empty: with the strings, about 900 B a row, 450 MB at 10,000 nodes × 50 VMs. Here each row
//! is one allocation, found by binary search over a vector of pointers; the uuid lives once, in
//! the row, shared with the duplicate index.
//!
//! The rows are boxed so that inserting in order moves pointers, not rows: at
//! `max_vms_per_node` (4,096) an insert moves at most 32 KiB, whatever a node sends. A snapshot
//! that brings k new uuids moves at most k × 32 KiB (64 MiB, some milliseconds, for a node that
//! swaps 4,096 VMs for 4,096 others), less than writing its 2k journal entries and rows costs.

use crate::rules::Vm;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VmRows {
    /// Sorted by `uuid`, one row per uuid. Boxed on purpose (see the module's doc).
    #[allow(clippy::vec_box)]
    rows: Vec<Box<Vm>>,
}

impl VmRows {
    fn find(&self, uuid: &str) -> Result<usize, usize> {
        self.rows.binary_search_by(|vm| (*vm.uuid).cmp(uuid))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn get(&self, uuid: &str) -> Option<&Vm> {
        self.find(uuid).ok().map(|i| &*self.rows[i])
    }

    pub fn get_mut(&mut self, uuid: &str) -> Option<&mut Vm> {
        match self.find(uuid) {
            Ok(i) => Some(&mut *self.rows[i]),
            Err(_) => None,
        }
    }

    pub fn contains_key(&self, uuid: &str) -> bool {
        self.find(uuid).is_ok()
    }

    /// Puts `vm` under its own uuid, in place of the row there (returned) if any.
    pub fn insert(&mut self, vm: Vm) -> Option<Vm> {
        match self.find(&vm.uuid) {
            Ok(i) => Some(std::mem::replace(&mut *self.rows[i], vm)),
            Err(i) => {
                self.rows.insert(i, Box::new(vm));
                None
            }
        }
    }

    pub fn remove(&mut self, uuid: &str) -> Option<Vm> {
        self.find(uuid).ok().map(|i| *self.rows.remove(i))
    }

    /// The rows, by uuid.
    pub fn values(&self) -> impl Iterator<Item = &Vm> {
        self.rows.iter().map(|vm| &**vm)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Vm> {
        self.rows.iter_mut().map(|vm| &mut **vm)
    }

    /// Removes the rows `keep` refuses, in uuid order, and returns them.
    pub fn take_unless(&mut self, mut keep: impl FnMut(&Vm) -> bool) -> Vec<Vm> {
        self.rows
            .extract_if(.., |vm| !keep(vm))
            .map(|vm| *vm)
            .collect()
    }
}

#[cfg(test)]
impl std::ops::Index<&str> for VmRows {
    type Output = Vm;

    /// The row of `uuid`; panics when there is none, as `BTreeMap`'s index does.
    fn index(&self, uuid: &str) -> &Vm {
        match self.get(uuid) {
            Some(vm) => vm,
            None => panic!("no VM row {uuid}"),
        }
    }
}

impl IntoIterator for VmRows {
    type Item = Vm;
    type IntoIter = std::iter::Map<std::vec::IntoIter<Box<Vm>>, fn(Box<Vm>) -> Vm>;

    /// The rows, by uuid.
    fn into_iter(self) -> Self::IntoIter {
        self.rows.into_iter().map(|vm| *vm)
    }
}

impl FromIterator<Vm> for VmRows {
    /// Rows in any order; of two with the same uuid the later one stays (as inserting them one
    /// by one would leave).
    fn from_iter<I: IntoIterator<Item = Vm>>(iter: I) -> VmRows {
        let mut rows: Vec<Box<Vm>> = iter.into_iter().map(Box::new).collect();
        // Stable: equal uuids keep their order, so the last of each run is the later one.
        rows.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        let mut unique: Vec<Box<Vm>> = Vec::with_capacity(rows.len());
        for vm in rows {
            match unique.last_mut() {
                Some(last) if last.uuid == vm.uuid => *last = vm,
                _ => unique.push(vm),
            }
        }
        VmRows { rows: unique }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn vm(uuid: &str, state: &str) -> Vm {
        Vm::for_test("n", uuid, state)
    }

    #[test]
    fn later_rows_of_one_uuid_win_when_collected() {
        let rows: VmRows = [vm("b", "running"), vm("a", "paused"), vm("b", "shutoff")]
            .into_iter()
            .collect();
        let got: Vec<(&str, &str)> = rows.values().map(|v| (&*v.uuid, &*v.state)).collect();
        assert_eq!(got, [("a", "paused"), ("b", "shutoff")]);
    }

    proptest! {
        /// The rows behave as the `BTreeMap<String, Vm>` they replaced, under any sequence of
        /// inserts, removals and filtering.
        #[test]
        fn rows_behave_as_a_sorted_map(ops in proptest::collection::vec((0u8..3, 0u8..12, 0u8..3), 0..200)) {
            let mut rows = VmRows::default();
            let mut model: BTreeMap<String, Vm> = BTreeMap::new();
            let states = ["running", "paused", "shutoff"];
            for (op, key, state) in ops {
                let uuid = format!("u{key:02}");
                match op {
                    0 => {
                        let v = vm(&uuid, states[state as usize]);
                        prop_assert_eq!(rows.insert(v.clone()), model.insert(uuid.clone(), v));
                    }
                    1 => prop_assert_eq!(rows.remove(&uuid), model.remove(&uuid)),
                    _ => {
                        let drop_state = states[state as usize];
                        let taken = rows.take_unless(|v| v.state != drop_state);
                        let expected: Vec<Vm> = model.values().filter(|v| v.state == drop_state).cloned().collect();
                        model.retain(|_, v| v.state != drop_state);
                        prop_assert_eq!(taken, expected);
                    }
                }
                prop_assert_eq!(rows.len(), model.len());
                prop_assert!(rows.values().map(|v| &*v.uuid).eq(model.keys().map(String::as_str)));
                prop_assert!(rows.values().eq(model.values()));
                prop_assert_eq!(rows.get(&uuid), model.get(&uuid));
                prop_assert_eq!(rows.contains_key(&uuid), model.contains_key(&uuid));
            }
        }
    }
}
