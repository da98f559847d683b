//! The registry of enrolled nodes (SPEC §10): which CURVE client keys the node port accepts,
//! and as which node id. Pure: a [`Snapshot`] is built from the enrollment rows; [`Shared`]
//! hands the current one to the ingest thread (ZAP, per-message checks), the core (revoked
//! nodes leave the inventory) and the API.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use crate::store::Enrollment;

/// The registry as of one version of the `enrollment` table.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The table's `registry_version` this was built from.
    pub version: i64,
    by_key: HashMap<[u8; 32], String>,
    enrolled: HashSet<String>,
    revoked: HashSet<String>,
    /// Every row, for the core's journal entries.
    pub rows: Vec<Enrollment>,
}

impl Snapshot {
    /// Builds the registry from its rows; `key_of` gives a node's public key when its row has
    /// none (a row a migration enrolled) or an unreadable one.
    pub fn build(
        version: i64,
        rows: Vec<Enrollment>,
        key_of: impl Fn(&str) -> Option<[u8; 32]>,
    ) -> Snapshot {
        let mut s = Snapshot {
            version,
            ..Snapshot::default()
        };
        for row in &rows {
            if row.revoked_at.is_some() {
                s.revoked.insert(row.node_id.clone());
                continue;
            }
            let key = vmwatch_common::keys::z85_decode(&row.public_key)
                .ok()
                .or_else(|| key_of(&row.node_id));
            if let Some(key) = key {
                s.by_key.insert(key, row.node_id.clone());
            }
            s.enrolled.insert(row.node_id.clone());
        }
        s.rows = rows;
        s
    }

    /// The enrolled, unrevoked node whose CURVE public key this is.
    pub fn node_of_key(&self, key: &[u8]) -> Option<&str> {
        let key: &[u8; 32] = key.try_into().ok()?;
        self.by_key.get(key).map(String::as_str)
    }

    pub fn is_enrolled(&self, node_id: &str) -> bool {
        self.enrolled.contains(node_id)
    }

    pub fn is_revoked(&self, node_id: &str) -> bool {
        self.revoked.contains(node_id)
    }

    /// Whether any node is revoked (most registries: none, and the per-message check is free).
    pub fn has_revoked(&self) -> bool {
        !self.revoked.is_empty()
    }

    pub fn enrolled_count(&self) -> usize {
        self.enrolled.len()
    }
}

/// The current registry, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct Shared {
    current: RwLock<Arc<Snapshot>>,
}

impl Shared {
    pub fn new(s: Snapshot) -> Shared {
        Shared {
            current: RwLock::new(Arc::new(s)),
        }
    }

    pub fn get(&self) -> Arc<Snapshot> {
        // A panic while holding the lock cannot leave a half-written Arc: take it anyway.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Installs `s` unless the current one is as new.
    pub fn set(&self, s: Snapshot) -> bool {
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.version >= s.version {
            return false;
        }
        *g = Arc::new(s);
        true
    }
}

/// Loads the registry from the database; the keys of rows without one are derived from the
/// configuration's `secret`.
pub fn load(
    db: &mut crate::store::Registry,
    config: &crate::config::MasterConfig,
) -> Result<Snapshot, crate::store::StoreError> {
    let version = db.version()?;
    Ok(Snapshot::build(version, db.all()?, |n| {
        config.node_public_key(n)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: &str, revoked: bool) -> Enrollment {
        Enrollment {
            node_id: id.into(),
            public_key: key.into(),
            enrolled_at: 1,
            revoked_at: revoked.then_some(2),
            journaled: String::new(),
        }
    }

    #[test]
    fn keys_map_to_enrolled_nodes_only() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let s = Snapshot::build(
            3,
            vec![
                row("a", &vmwatch_common::keys::z85_encode(&a), false),
                row("b", "", false),
                row("c", "", true),
            ],
            |n| (n == "b").then_some(b),
        );
        assert_eq!(s.node_of_key(&a), Some("a"));
        assert_eq!(s.node_of_key(&b), Some("b"));
        assert_eq!(s.node_of_key(&[3u8; 32]), None);
        assert_eq!(s.node_of_key(&[1u8; 5]), None);
        assert!(s.is_enrolled("a") && !s.is_enrolled("c"));
        assert!(s.is_revoked("c") && !s.is_revoked("a"));
        let shared = Shared::new(s);
        assert!(!shared.set(Snapshot::build(2, vec![], |_| None)));
        assert!(shared.set(Snapshot::build(4, vec![], |_| None)));
        assert_eq!(shared.get().enrolled_count(), 0);
    }
}
