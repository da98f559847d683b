//! The embedded database (SQLite, WAL): the only module that contains SQL.
//!
//! The core thread owns the one writing [`Store`]; API handlers use [`Reader`]s on their own
//! connections, which see every committed transaction and never block the writer (WAL).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, Row, Transaction};
use serde::Serialize;

use crate::rules::{Effect, Entry, Inventory, Node, Vm};

const SCHEMA_VERSION: i64 = 6;

/// From schema 1 (v0.1) to 2: unknown rows and superseded boots.
const MIGRATE_TO_2: &str = "
ALTER TABLE vms ADD COLUMN last_state TEXT;
ALTER TABLE vms ADD COLUMN unknown_since INTEGER;
ALTER TABLE vms ADD COLUMN unknown_reason TEXT;
ALTER TABLE nodes ADD COLUMN libvirt_down_since INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN superseded TEXT NOT NULL DEFAULT '[]';
";

/// From schema 2 to 3: no index on `received_at` (one index write less per journal entry;
/// retention finds its cutoff in id order instead).
const MIGRATE_TO_3: &str = "
DROP INDEX IF EXISTS journal_received;
";

/// From schema 3 to 4: the event bus's cursor, the last journal id the broker confirmed (one
/// row, present once a bus was configured).
const MIGRATE_TO_4: &str = "
CREATE TABLE IF NOT EXISTS bus_cursor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    journal_id INTEGER NOT NULL
);
";

/// From schema 4 to 5: the activity history, one row per VM, node and UTC day holding the
/// day's points packed one after another (`activity::encode`).
const MIGRATE_TO_5: &str = "
CREATE TABLE IF NOT EXISTS activity (
    uuid TEXT NOT NULL,
    node_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    points BLOB NOT NULL,
    PRIMARY KEY (uuid, node_id, day)
) WITHOUT ROWID;
";

/// From schema 5 to 6: enrolled nodes (SPEC §10) and the registry's version, which every
/// enrollment or revocation bumps so that a running master sees a CLI change. `journaled` is the
/// last state (`enrolled`, `revoked`) the core wrote a journal entry for.
const MIGRATE_TO_6: &str = "
CREATE TABLE IF NOT EXISTS enrollment (
    node_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL DEFAULT '',
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    journaled TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO settings (key, value) VALUES ('registry_version', 1);
";

/// Appends a point to its day's row (`activity::encode`).
pub const ACTIVITY_APPEND: &str = "\
     INSERT INTO activity (uuid, node_id, day, points) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (uuid, node_id, day) DO UPDATE SET \
     points = CAST(points || excluded.points AS BLOB)";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    up INTEGER NOT NULL,
    libvirt_up INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    boot TEXT NOT NULL,
    boot_ts INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    version TEXT NOT NULL,
    hostname TEXT NOT NULL,
    libvirt_version TEXT NOT NULL,
    domains INTEGER NOT NULL,
    gaps INTEGER NOT NULL,
    lost INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    node_id TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    state_since INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    idle_net INTEGER NOT NULL DEFAULT 0,
    idle_disk INTEGER NOT NULL DEFAULT 0,
    duplicate INTEGER NOT NULL DEFAULT 0,
    usage TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (node_id, uuid)
);
CREATE INDEX IF NOT EXISTS vms_uuid ON vms(uuid);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    event_ts INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    uuid TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_uuid ON journal(uuid, id);
CREATE TABLE IF NOT EXISTS outbox (
    journal_id INTEGER PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS dead_letters (
    journal_id INTEGER PRIMARY KEY,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    dead_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_node ON journal(node_id, id);
";

/// A database error, with what we were doing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {} {purpose}: {source}", path.display())]
    Open {
        path: std::path::PathBuf,
        /// `for writing`, `for the outbox`, `for reading`.
        purpose: &'static str,
        source: rusqlite::Error,
    },
    #[error("database {} has schema version {found}, newer than this master understands ({supported})", path.display())]
    NewerSchema {
        path: std::path::PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{step}: {source}")]
    Sqlite {
        step: &'static str,
        source: rusqlite::Error,
    },
}

fn ctx(step: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { step, source }
}

fn open_error(path: &Path, purpose: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Open {
        path,
        purpose,
        source,
    }
}

/// The writer connection's settings. Public so that the benchmark's raw-SQLite reference
/// (`vmwatch-loadgen events`) runs with exactly these.
pub fn tune_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk before the batch is acknowledged (batches keep it cheap).
    conn.pragma_update(None, "synchronous", "FULL")?;
    // A page cache that holds the indexes' hot pages at fleet scale (the default is 2 MiB).
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    // Checkpoint every 64 MiB of WAL instead of every 4 MiB: fewer, larger checkpoints. (A
    // checkpoint thread of its own was tried: its fsyncs beside the writer's raised the p99
    // send → visible latency from 4-6 ms to 7-8 ms at 1,000 events/s.)
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
}

/// `cache_size` in KiB when negative (SQLite's convention): 64 MiB.
const WRITER_CACHE_KIB: i64 = -65_536;
/// Pages of WAL before an automatic checkpoint (at 4 KiB a page: 64 MiB).
const WAL_CHECKPOINT_PAGES: i64 = 16_384;

/// The writing side.
pub struct Store {
    conn: Connection,
    /// Whether journal entries also go to the webhook outbox (`panel_url` is set).
    outbox: bool,
    /// Whether retention waits for the event bus (`bus_url` is set).
    bus: bool,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = Connection::open(path).map_err(open_error(path, "for writing"))?;
        tune_writer(&conn).map_err(ctx("configure the writer"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(ctx("set busy timeout"))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(ctx("read schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::NewerSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        // Schema 1's tables, then each migration, in one transaction.
        let tx = conn.transaction().map_err(ctx("begin schema upgrade"))?;
        let fresh = version == 0
            && tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'nodes'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(ctx("read schema"))?
                == 0;
        tx.execute_batch(SCHEMA).map_err(ctx("create schema"))?;
        if version < 2 {
            tx.execute_batch(MIGRATE_TO_2)
                .map_err(ctx("upgrade the schema to version 2"))?;
        }
        if version < 3 {
            tx.execute_batch(MIGRATE_TO_3)
                .map_err(ctx("upgrade the schema to version 3"))?;
        }
        if version < 4 {
            tx.execute_batch(MIGRATE_TO_4)
                .map_err(ctx("upgrade the schema to version 4"))?;
        }
        if version < 5 {
            tx.execute_batch(MIGRATE_TO_5)
                .map_err(ctx("upgrade the schema to version 5"))?;
        }
        if version < 6 {
            tx.execute_batch(MIGRATE_TO_6)
                .map_err(ctx("upgrade the schema to version 6"))?;
            // A database from before per-node keys: every node it knows is enrolled (no
            // journal entry: they were there before), and the fleet key keeps working until
            // the operator says `allow_fleet_transport=no` (SPEC §10, "Upgrade").
            if !fresh {
                tx.execute(
                    "INSERT OR IGNORE INTO enrollment (node_id, enrolled_at, journaled) \
                     SELECT node_id, ?1, 'enrolled' FROM nodes",
                    params![vmwatch_common::time::now_ms() as i64],
                )
                .map_err(ctx("enroll the known nodes"))?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('fleet_transport', ?1)",
                params![!fresh],
            )
            .map_err(ctx("record the fleet key's standing"))?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(ctx("set schema version"))?;
        tx.commit().map_err(ctx("commit schema upgrade"))?;
        Ok(Store {
            conn,
            outbox: false,
            bus: false,
        })
    }

    /// Makes every journal entry written from now on wait in the outbox for the panel.
    pub fn enable_outbox(&mut self) {
        self.outbox = true;
    }

    /// Keeps every journal entry the event bus has not had confirmed out of retention's reach.
    /// The first time, the bus starts at the journal's end: it publishes what is written from
    /// now on, not the history already stored.
    pub fn enable_bus(&mut self) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO bus_cursor (id, journal_id) \
                 SELECT 1, coalesce(max(id), 0) FROM journal",
                [],
            )
            .map_err(ctx("create the bus cursor"))?;
        self.bus = true;
        Ok(())
    }

    /// Journal entries stored.
    pub fn journal_size(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM journal", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(ctx("count journal"))
    }

    /// Whether journal entries go to the outbox.
    pub fn outbox_enabled(&self) -> bool {
        self.outbox
    }

    /// Writes effects and commits them as one durable transaction; returns the new journal
    /// ids.
    pub fn commit(&mut self, effects: &[Effect]) -> Result<Vec<i64>, StoreError> {
        let outbox = self.outbox;
        let tx = self.conn.transaction().map_err(ctx("begin transaction"))?;
        let ids = apply(&tx, effects)?;
        if outbox {
            let mut stmt = tx
                .prepare_cached("INSERT INTO outbox (journal_id) VALUES (?1)")
                .map_err(ctx("write outbox"))?;
            for id in &ids {
                stmt.execute(params![id]).map_err(ctx("write outbox"))?;
            }
        }
        tx.commit().map_err(ctx("commit"))?;
        Ok(ids)
    }

    /// Deletes journal entries received before `cutoff` (unix ms), except those still waiting
    /// in the outbox, kept as dead letters, or (with the bus on) not yet confirmed by the broker.
    /// Returns how many went.
    ///
    /// In journal order: everything before the first entry received at or after the cutoff
    /// (found by walking ids from the oldest, which only visits what is purged or kept for the
    /// panel), so no index on `received_at` costs every write. An entry is never purged early;
    /// one written while the master's clock stood behind waits for its neighbours.
    pub fn purge_journal(&mut self, cutoff: u64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "DELETE FROM journal WHERE id < coalesce(\
                   (SELECT id FROM journal WHERE received_at >= ?1 ORDER BY id LIMIT 1), \
                   (SELECT max(id) + 1 FROM journal)) \
                 AND id NOT IN (SELECT journal_id FROM outbox) \
                 AND id NOT IN (SELECT journal_id FROM dead_letters) \
                 AND (?2 = 0 OR id <= (SELECT journal_id FROM bus_cursor))",
                params![cutoff as i64, self.bus],
            )
            .map_err(ctx("purge journal"))
    }

    /// Deletes activity rows of days before `cutoff_day`; returns how many went.
    pub fn purge_activity(&mut self, cutoff_day: u64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "DELETE FROM activity WHERE day < ?1",
                params![cutoff_day as i64],
            )
            .map_err(ctx("purge activity"))
    }

    /// Loads the inventory the rules decide over.
    pub fn load_inventory(&self) -> Result<Inventory, StoreError> {
        let mut inv = Inventory::default();
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM nodes")
            .map_err(ctx("load nodes"))?;
        let nodes = stmt
            .query_map([], node_from_row)
            .map_err(ctx("load nodes"))?;
        for n in nodes {
            let n = n.map_err(ctx("load nodes"))?;
            inv.nodes.insert(n.node_id.clone(), n);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM vms")
            .map_err(ctx("load vms"))?;
        let vms = stmt.query_map([], vm_from_row).map_err(ctx("load vms"))?;
        for vm in vms {
            let vm = vm.map_err(ctx("load vms"))?;
            inv.vms
                .entry(vm.node_id.clone())
                .or_insert_with(BTreeMap::new)
                .insert(vm.uuid.clone(), vm);
        }
        Ok(inv)
    }
}

/// The core's row writes, public so that the benchmark's raw-SQLite reference runs the very
/// same statements. Rows are upserts, not INSERT OR REPLACE: a row that exists is updated in
/// place, so the indexes on columns that did not change are not rewritten.
pub const NODE_UPSERT: &str = "\
     INSERT INTO nodes (node_id, up, libvirt_up, first_seen, last_seen, boot, boot_ts, \
     last_seq, version, hostname, libvirt_version, domains, gaps, lost, libvirt_down_since, superseded) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
     ON CONFLICT (node_id) DO UPDATE SET up = excluded.up, libvirt_up = excluded.libvirt_up, \
     first_seen = excluded.first_seen, last_seen = excluded.last_seen, \
     boot = excluded.boot, boot_ts = excluded.boot_ts, last_seq = excluded.last_seq, \
     version = excluded.version, hostname = excluded.hostname, \
     libvirt_version = excluded.libvirt_version, domains = excluded.domains, \
     gaps = excluded.gaps, lost = excluded.lost, \
     libvirt_down_since = excluded.libvirt_down_since, \
     superseded = excluded.superseded";
pub const VM_UPSERT: &str = "\
     INSERT INTO vms (node_id, uuid, name, state, reason, state_since, updated_at, \
     idle_net, idle_disk, duplicate, usage, last_state, unknown_since, unknown_reason) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
     ON CONFLICT (node_id, uuid) DO UPDATE SET name = excluded.name, state = excluded.state, \
     reason = excluded.reason, \
     state_since = excluded.state_since, updated_at = excluded.updated_at, \
     idle_net = excluded.idle_net, idle_disk = excluded.idle_disk, \
     duplicate = excluded.duplicate, usage = excluded.usage, \
     last_state = excluded.last_state, unknown_since = excluded.unknown_since, \
     unknown_reason = excluded.unknown_reason";
pub const JOURNAL_INSERT: &str = "\
     INSERT INTO journal (received_at, event_ts, node_id, uuid, name, type, event, detail, state) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Writes effects inside a transaction; returns the ids given to journal entries.
fn apply(tx: &Transaction<'_>, effects: &[Effect]) -> Result<Vec<i64>, StoreError> {
    let mut ids = Vec::new();
    for effect in effects {
        match effect {
            Effect::UpsertNode(n) => write_node(tx, n)?,
            Effect::UpsertVm(vm) => write_vm(tx, vm)?,
            Effect::RemoveVm { node_id, uuid } => remove_vm(tx, node_id, uuid)?,
            Effect::RemoveNode { node_id } => tx
                .prepare_cached("DELETE FROM nodes WHERE node_id = ?1")
                .and_then(|mut s| s.execute(params![node_id]))
                .map(|_| ())
                .map_err(ctx("remove node"))?,
            Effect::EnrollmentJournaled { node_id, state } => tx
                .prepare_cached("UPDATE enrollment SET journaled = ?2 WHERE node_id = ?1")
                .and_then(|mut s| s.execute(params![node_id, state]))
                .map(|_| ())
                .map_err(ctx("mark enrollment journaled"))?,
            Effect::Journal(e) => ids.push(write_journal(tx, e)?),
            Effect::Activity {
                node_id,
                uuid,
                point,
            } => tx
                .prepare_cached(ACTIVITY_APPEND)
                .and_then(|mut s| {
                    s.execute(params![
                        uuid,
                        node_id,
                        crate::activity::day_of(point.ts) as i64,
                        crate::activity::encode(point)
                    ])
                })
                .map(|_| ())
                .map_err(ctx("write activity"))?,
        }
    }
    Ok(ids)
}

fn write_node(tx: &Transaction<'_>, n: &Node) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(NODE_UPSERT).map_err(ctx("write node"))?;
    stmt.execute(params![
        n.node_id,
        n.up,
        n.libvirt_up,
        n.first_seen as i64,
        n.last_seen as i64,
        n.boot,
        n.boot_ts as i64,
        n.last_seq as i64,
        n.version,
        n.hostname,
        n.libvirt_version,
        n.domains as i64,
        n.gaps as i64,
        n.lost as i64,
        n.libvirt_down_since as i64,
        // A list of (string, number) pairs always serialises.
        serde_json::to_string(&n.superseded).unwrap_or_else(|_| "[]".into())
    ])
    .map_err(ctx("write node"))?;
    Ok(())
}

fn write_vm(tx: &Transaction<'_>, vm: &Vm) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(VM_UPSERT).map_err(ctx("write vm"))?;
    stmt.execute(params![
        vm.node_id,
        vm.uuid,
        vm.name,
        vm.state,
        vm.reason,
        vm.state_since as i64,
        vm.updated_at as i64,
        vm.usage.net.idle,
        vm.usage.disk.idle,
        vm.duplicate,
        // Plain structs of numbers and booleans always serialise.
        usage_column::encode(&vm.usage),
        vm.last_state,
        vm.unknown_since.map(|t| t as i64),
        vm.unknown_reason
    ])
    .map_err(ctx("write vm"))?;
    Ok(())
}

fn remove_vm(tx: &Transaction<'_>, node_id: &str, uuid: &str) -> Result<(), StoreError> {
    let mut stmt = tx
        .prepare_cached("DELETE FROM vms WHERE node_id = ?1 AND uuid = ?2")
        .map_err(ctx("remove vm"))?;
    stmt.execute(params![node_id, uuid])
        .map_err(ctx("remove vm"))?;
    Ok(())
}

/// Appends a journal entry; returns its id.
fn write_journal(tx: &Transaction<'_>, e: &Entry) -> Result<i64, StoreError> {
    let mut stmt = tx
        .prepare_cached(JOURNAL_INSERT)
        .map_err(ctx("write journal"))?;
    stmt.execute(params![
        e.received_at as i64,
        e.event_ts as i64,
        e.node_id,
        e.uuid,
        e.name,
        e.kind.as_str(),
        e.event,
        e.detail,
        e.state
    ])
    .map_err(ctx("write journal"))?;
    Ok(tx.last_insert_rowid())
}

fn get_u64(row: &Row<'_>, col: &str) -> rusqlite::Result<u64> {
    row.get::<_, i64>(col).map(|v| v.max(0) as u64)
}

fn node_from_row(row: &Row<'_>) -> rusqlite::Result<Node> {
    Ok(Node {
        node_id: row.get("node_id")?,
        up: row.get("up")?,
        libvirt_up: row.get("libvirt_up")?,
        first_seen: get_u64(row, "first_seen")?,
        last_seen: get_u64(row, "last_seen")?,
        boot: row.get("boot")?,
        boot_ts: get_u64(row, "boot_ts")?,
        last_seq: get_u64(row, "last_seq")?,
        version: row.get("version")?,
        hostname: row.get("hostname")?,
        libvirt_version: row.get("libvirt_version")?,
        domains: get_u64(row, "domains")?,
        gaps: get_u64(row, "gaps")?,
        lost: get_u64(row, "lost")?,
        libvirt_down_since: get_u64(row, "libvirt_down_since")?,
        // Unreadable: forgetting old boots only weakens replay protection for max_message_age.
        superseded: serde_json::from_str(&row.get::<_, String>("superseded")?).unwrap_or_default(),
    })
}

fn vm_from_row(row: &Row<'_>) -> rusqlite::Result<Vm> {
    Ok(Vm {
        node_id: row.get("node_id")?,
        uuid: row.get("uuid")?,
        name: row.get("name")?,
        state: row.get("state")?,
        reason: row.get("reason")?,
        state_since: get_u64(row, "state_since")?,
        updated_at: get_u64(row, "updated_at")?,
        // A usage column we cannot read costs only the idle history, never the row.
        usage: usage_column::decode(&row.get::<_, String>("usage")?),
        duplicate: row.get("duplicate")?,
        last_state: row.get("last_state")?,
        unknown_since: row
            .get::<_, Option<i64>>("unknown_since")?
            .map(|t| t.max(0) as u64),
        unknown_reason: row.get("unknown_reason")?,
    })
}

/// A journal entry the panel refused for good (`GET /api/v1/dead-letters`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The panel's last HTTP status for it.
    pub status: u16,
    pub attempts: u64,
    pub dead_at: u64,
    pub entry: JournalRow,
}

/// A journal entry as the API shows it: also the body of the panel webhook and of the event
/// bus messages.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct JournalRow {
    pub id: i64,
    pub received_at: u64,
    pub event_ts: u64,
    pub node_id: String,
    pub uuid: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event: String,
    pub detail: String,
    pub state: String,
}

fn journal_from_row(row: &Row<'_>) -> rusqlite::Result<JournalRow> {
    Ok(JournalRow {
        id: row.get("id")?,
        received_at: get_u64(row, "received_at")?,
        event_ts: get_u64(row, "event_ts")?,
        node_id: row.get("node_id")?,
        uuid: row.get("uuid")?,
        name: row.get("name")?,
        kind: row.get("type")?,
        event: row.get("event")?,
        detail: row.get("detail")?,
        state: row.get("state")?,
    })
}

/// The outbox on a connection of its own: the webhook deliverer deletes acknowledged entries
/// and moves refused ones to the dead letters; `POST /dead-letters/{id}/retry` moves one back.
/// Nodes, VMs and the journal are only ever written by the core.
pub struct Outbox {
    conn: Connection,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, StoreError> {
        let conn = Connection::open(path).map_err(open_error(path, "for the outbox"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(ctx("set busy timeout"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(ctx("set synchronous"))?;
        Ok(Outbox { conn })
    }

    /// The oldest undelivered entries, in journal order.
    pub fn pending(&self, limit: u32) -> Result<Vec<JournalRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT journal.* FROM outbox JOIN journal ON journal.id = outbox.journal_id \
                 ORDER BY outbox.journal_id LIMIT ?1",
            )
            .map_err(ctx("read outbox"))?;
        let rows = stmt
            .query_map(params![limit], journal_from_row)
            .map_err(ctx("read outbox"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("read outbox"))
    }

    /// Removes delivered entries from the outbox (one transaction).
    pub fn ack(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(ctx("begin outbox ack"))?;
        {
            let mut stmt = tx
                .prepare_cached("DELETE FROM outbox WHERE journal_id = ?1")
                .map_err(ctx("ack outbox"))?;
            for id in ids {
                stmt.execute(params![id]).map_err(ctx("ack outbox"))?;
            }
        }
        tx.commit().map_err(ctx("commit outbox ack"))
    }

    /// Moves an entry the panel refuses for good from the outbox to the dead letters.
    pub fn dead_letter(
        &mut self,
        id: i64,
        status: u16,
        attempts: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(ctx("begin dead letter"))?;
        tx.execute(
            "INSERT OR REPLACE INTO dead_letters (journal_id, status, attempts, dead_at) VALUES (?1, ?2, ?3, ?4)",
            params![id, status, attempts, now as i64],
        )
        .map_err(ctx("write dead letter"))?;
        tx.execute("DELETE FROM outbox WHERE journal_id = ?1", params![id])
            .map_err(ctx("write dead letter"))?;
        tx.commit().map_err(ctx("commit dead letter"))
    }

    /// Puts a dead letter back at its place in the outbox (journal order). `false` if there is
    /// no dead letter with this id.
    pub fn retry_dead_letter(&mut self, id: i64) -> Result<bool, StoreError> {
        let tx = self.conn.transaction().map_err(ctx("begin retry"))?;
        let n = tx
            .execute(
                "DELETE FROM dead_letters WHERE journal_id = ?1",
                params![id],
            )
            .map_err(ctx("retry dead letter"))?;
        if n == 1 {
            tx.execute(
                "INSERT OR IGNORE INTO outbox (journal_id) VALUES (?1)",
                params![id],
            )
            .map_err(ctx("retry dead letter"))?;
        }
        tx.commit().map_err(ctx("commit retry"))?;
        Ok(n == 1)
    }

    /// Dead letters stored.
    pub fn dead_letter_count(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM dead_letters", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(ctx("count dead letters"))
    }

    /// Entries waiting.
    pub fn depth(&self) -> Result<u64, StoreError> {
        self.conn
            .query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(ctx("count outbox"))
    }
}

/// The event bus's side of the journal, on a connection of its own: the entries after its
/// cursor, and the cursor, moved once the broker confirmed them.
pub struct BusCursor {
    conn: Connection,
}

impl BusCursor {
    pub fn open(path: &Path) -> Result<BusCursor, StoreError> {
        let conn = Connection::open(path).map_err(open_error(path, "for the event bus"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(ctx("set busy timeout"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(ctx("set synchronous"))?;
        Ok(BusCursor { conn })
    }

    /// The last journal id the broker confirmed (0 before any).
    pub fn position(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                "SELECT coalesce((SELECT journal_id FROM bus_cursor), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(ctx("read the bus cursor"))
    }

    /// The newest journal id (0 if the journal is empty): with the position, the lag.
    pub fn journal_end(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("SELECT coalesce(max(id), 0) FROM journal", [], |r| r.get(0))
            .map_err(ctx("read the journal end"))
    }

    /// Up to `limit` entries after `id`, in journal order.
    pub fn after(&self, id: i64, limit: u32) -> Result<Vec<JournalRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT * FROM journal WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(ctx("read the journal for the bus"))?;
        let rows = stmt
            .query_map(params![id, limit], journal_from_row)
            .map_err(ctx("read the journal for the bus"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("read the journal for the bus"))
    }

    /// Moves the cursor to `id`, durably: everything up to it is confirmed.
    pub fn advance(&mut self, id: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO bus_cursor (id, journal_id) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET journal_id = max(journal_id, excluded.journal_id)",
                params![id],
            )
            .map(|_| ())
            .map_err(ctx("move the bus cursor"))
    }
}

/// Filters of `GET /api/v1/vms`.
#[derive(Debug, Default, Clone)]
pub struct VmFilter {
    pub node: Option<String>,
    pub state: Option<String>,
    /// Only VMs with an idle flag (network or disk).
    pub idle: bool,
    /// Only VMs flagged duplicate.
    pub duplicate: bool,
    pub limit: u32,
    pub offset: u64,
}

/// Filters of `GET /api/v1/events`.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub after: i64,
    pub node: Option<String>,
    pub uuid: Option<String>,
    pub kind: Option<String>,
    pub limit: u32,
}

/// One enrolled node (SPEC §10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enrollment {
    pub node_id: String,
    /// Z85 of its CURVE public key (empty until the master has filled it in after a migration).
    pub public_key: String,
    pub enrolled_at: u64,
    pub revoked_at: Option<u64>,
    /// The last state the core journaled: `enrolled`, `revoked`, or empty.
    #[serde(skip)]
    pub journaled: String,
}

impl Enrollment {
    /// `enrolled` or `revoked`: what the journal should say of it.
    pub fn state(&self) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else {
            "enrolled"
        }
    }
}

/// What an enrollment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolled {
    New,
    Already,
    /// Revoked before: not enrolled again (its key derives from its id, so it would be the
    /// revoked key).
    Revoked,
}

/// What a revocation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    Now,
    Already,
    NotEnrolled,
}

/// The registry of enrolled nodes on a connection of its own: read by the ingest thread's
/// watcher, written by the enrollment API and the `enroll`/`revoke` commands.
pub struct Registry {
    conn: Connection,
}

impl Registry {
    /// Opens an existing database (the writer created and migrated it).
    pub fn open(path: &Path) -> Result<Registry, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error(path, "for the node registry"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(ctx("set busy timeout"))?;
        Ok(Registry { conn })
    }

    /// Bumped by every enrollment and revocation.
    pub fn version(&self) -> Result<i64, StoreError> {
        self.conn
            .prepare_cached("SELECT value FROM settings WHERE key = 'registry_version'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(ctx("read the registry version"))
    }

    /// Whether the database predates per-node keys (the fleet key stays accepted by default).
    pub fn fleet_transport(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT value FROM settings WHERE key = 'fleet_transport'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v != 0)
            .map_err(ctx("read the fleet key's standing"))
    }

    pub fn all(&self) -> Result<Vec<Enrollment>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT node_id, public_key, enrolled_at, revoked_at, journaled FROM enrollment",
            )
            .map_err(ctx("load enrollments"))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Enrollment {
                    node_id: r.get(0)?,
                    public_key: r.get(1)?,
                    enrolled_at: get_u64_at(r, 2)?,
                    revoked_at: r.get::<_, Option<i64>>(3)?.map(|v| v.max(0) as u64),
                    journaled: r.get(4)?,
                })
            })
            .map_err(ctx("load enrollments"))?;
        rows.collect::<Result<_, _>>()
            .map_err(ctx("load enrollments"))
    }

    /// Enrolls `node_id` with its public key (idempotent).
    pub fn enroll(
        &mut self,
        node_id: &str,
        public_key: &str,
        now: u64,
    ) -> Result<Enrolled, StoreError> {
        let tx = self.conn.transaction().map_err(ctx("begin enrollment"))?;
        let found: Option<Option<i64>> = tx
            .query_row(
                "SELECT revoked_at FROM enrollment WHERE node_id = ?1",
                params![node_id],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(ctx("read enrollment"))?;
        let outcome = match found {
            Some(Some(_)) => Enrolled::Revoked,
            Some(None) => {
                tx.execute(
                    "UPDATE enrollment SET public_key = ?2 WHERE node_id = ?1 AND public_key = ''",
                    params![node_id, public_key],
                )
                .map_err(ctx("write enrollment"))?;
                Enrolled::Already
            }
            None => {
                tx.execute(
                    "INSERT INTO enrollment (node_id, public_key, enrolled_at) VALUES (?1, ?2, ?3)",
                    params![node_id, public_key, now as i64],
                )
                .map_err(ctx("write enrollment"))?;
                bump(&tx)?;
                Enrolled::New
            }
        };
        tx.commit().map_err(ctx("commit enrollment"))?;
        Ok(outcome)
    }

    /// Revokes `node_id` (idempotent).
    pub fn revoke(&mut self, node_id: &str, now: u64) -> Result<Revoked, StoreError> {
        let tx = self.conn.transaction().map_err(ctx("begin revocation"))?;
        let changed = tx
            .execute(
                "UPDATE enrollment SET revoked_at = ?2 WHERE node_id = ?1 AND revoked_at IS NULL",
                params![node_id, now as i64],
            )
            .map_err(ctx("write revocation"))?;
        let outcome = if changed > 0 {
            bump(&tx)?;
            Revoked::Now
        } else {
            let known: i64 = tx
                .query_row(
                    "SELECT count(*) FROM enrollment WHERE node_id = ?1",
                    params![node_id],
                    |r| r.get(0),
                )
                .map_err(ctx("read enrollment"))?;
            if known > 0 {
                Revoked::Already
            } else {
                Revoked::NotEnrolled
            }
        };
        tx.commit().map_err(ctx("commit revocation"))?;
        Ok(outcome)
    }

    /// Fills in public keys the migration could not compute (it has no secret).
    pub fn fill_public_keys(
        &mut self,
        key_of: impl Fn(&str) -> Option<String>,
    ) -> Result<usize, StoreError> {
        let missing: Vec<String> = self
            .all()?
            .into_iter()
            .filter(|e| e.public_key.is_empty())
            .map(|e| e.node_id)
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let tx = self.conn.transaction().map_err(ctx("begin key fill"))?;
        for node_id in &missing {
            if let Some(key) = key_of(node_id) {
                tx.execute(
                    "UPDATE enrollment SET public_key = ?2 WHERE node_id = ?1",
                    params![node_id, key],
                )
                .map_err(ctx("fill public key"))?;
            }
        }
        tx.commit().map_err(ctx("commit key fill"))?;
        Ok(missing.len())
    }
}

fn bump(tx: &Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE settings SET value = value + 1 WHERE key = 'registry_version'",
        [],
    )
    .map(|_| ())
    .map_err(ctx("bump the registry version"))
}

fn get_u64_at(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(idx)?.max(0) as u64)
}

/// A read-only connection for the API.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(open_error(path, "for reading"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(ctx("set busy timeout"))?;
        Ok(Reader { conn })
    }

    /// A page of VM rows and the total count matching the filter.
    pub fn vms(&self, f: &VmFilter) -> Result<(Vec<Vm>, u64), StoreError> {
        // The optional filters are fixed SQL fragments: no user text is ever spliced in.
        let mut where_sql =
            String::from("WHERE (?1 IS NULL OR node_id = ?1) AND (?2 IS NULL OR state = ?2)");
        if f.idle {
            where_sql.push_str(" AND (idle_net OR idle_disk)");
        }
        if f.duplicate {
            where_sql.push_str(" AND duplicate");
        }
        let total: i64 = self
            .conn
            .query_row(
                &format!("SELECT count(*) FROM vms {where_sql}"),
                params![f.node, f.state],
                |r| r.get(0),
            )
            .map_err(ctx("count vms"))?;
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT * FROM vms {where_sql} ORDER BY name, node_id, uuid LIMIT ?3 OFFSET ?4"
            ))
            .map_err(ctx("list vms"))?;
        let rows = stmt
            .query_map(
                params![f.node, f.state, f.limit, f.offset as i64],
                vm_from_row,
            )
            .map_err(ctx("list vms"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(ctx("list vms"))?;
        Ok((rows, total.max(0) as u64))
    }

    /// Every row of one uuid (one per node).
    /// The activity of `uuid` (on `node`, or every node) from `from_day` to `to_day`
    /// inclusive: each row's node and points, in day order.
    pub fn activity(
        &self,
        uuid: &str,
        node: Option<&str>,
        from_day: u64,
        to_day: u64,
    ) -> Result<Vec<(String, Vec<crate::activity::Point>)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT node_id, day, points FROM activity WHERE uuid = ?1 \
                 AND (?2 IS NULL OR node_id = ?2) AND day BETWEEN ?3 AND ?4 ORDER BY day, node_id",
            )
            .map_err(ctx("read activity"))?;
        let rows = stmt
            .query_map(params![uuid, node, from_day as i64, to_day as i64], |r| {
                let day: i64 = r.get(1)?;
                // `||` makes text of blobs; the bytes are the same either way.
                let blob = r.get_ref(2)?.as_bytes()?;
                Ok((
                    r.get::<_, String>(0)?,
                    crate::activity::decode(blob, day.max(0) as u64),
                ))
            })
            .map_err(ctx("read activity"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("read activity"))
    }

    pub fn vm(&self, uuid: &str) -> Result<Vec<Vm>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT * FROM vms WHERE uuid = ?1 ORDER BY node_id")
            .map_err(ctx("read vm"))?;
        let rows = stmt
            .query_map(params![uuid], vm_from_row)
            .map_err(ctx("read vm"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(ctx("read vm"))
    }

    pub fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT * FROM nodes ORDER BY node_id")
            .map_err(ctx("list nodes"))?;
        let rows = stmt
            .query_map([], node_from_row)
            .map_err(ctx("list nodes"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("list nodes"))
    }

    /// The dead letters, oldest journal entry first, each with its entry.
    pub fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT dead_letters.status, dead_letters.attempts, dead_letters.dead_at, journal.* \
                 FROM dead_letters JOIN journal ON journal.id = dead_letters.journal_id \
                 ORDER BY dead_letters.journal_id LIMIT ?1",
            )
            .map_err(ctx("list dead letters"))?;
        let rows = stmt
            .query_map(params![limit], |row| {
                Ok(DeadLetter {
                    status: row.get::<_, i64>("status")?.clamp(0, 999) as u16,
                    attempts: get_u64(row, "attempts")?,
                    dead_at: get_u64(row, "dead_at")?,
                    entry: journal_from_row(row)?,
                })
            })
            .map_err(ctx("list dead letters"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("list dead letters"))
    }

    pub fn events(&self, f: &EventFilter) -> Result<Vec<JournalRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT * FROM journal WHERE id > ?1 AND (?2 IS NULL OR node_id = ?2) AND (?3 IS NULL OR uuid = ?3) \
                 AND (?4 IS NULL OR type = ?4) ORDER BY id LIMIT ?5",
            )
            .map_err(ctx("list events"))?;
        let rows = stmt
            .query_map(
                params![f.after, f.node, f.uuid, f.kind, f.limit],
                journal_from_row,
            )
            .map_err(ctx("list events"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(ctx("list events"))
    }
}

/// The `vms.usage` column: the idle rule's state as JSON. serde's remote derive describes
/// `idle::Usage` here, so the rule's types stay plain, the stored format changes only on
/// purpose, and a field added to the model without a column field does not compile.
mod usage_column {
    use serde::{Deserialize, Serialize};

    use crate::idle::{ByteCounters, Resource, Sample, Usage};

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "Usage")]
    struct UsageColumn {
        #[serde(with = "optional_sample")]
        sample: Option<Sample>,
        nics: u32,
        disks: u32,
        #[serde(with = "ResourceColumn")]
        net: Resource,
        #[serde(with = "ResourceColumn")]
        disk: Resource,
        last_window_ms: Option<u64>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "Sample")]
    struct SampleColumn {
        ts: u64,
        tx_pkts: u64,
        wr_reqs: u64,
        rx_pkts: u64,
        rd_reqs: u64,
        cpu_time_ns: u64,
        /// Absent in columns written before the activity history.
        #[serde(
            default,
            with = "optional_bytes",
            skip_serializing_if = "Option::is_none"
        )]
        bytes: Option<ByteCounters>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "ByteCounters")]
    struct BytesColumn {
        tx: u64,
        rx: u64,
        rd: u64,
        wr: u64,
    }

    mod optional_bytes {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        use super::{ByteCounters, BytesColumn};

        #[derive(Serialize, Deserialize)]
        struct Column(#[serde(with = "BytesColumn")] ByteCounters);

        pub fn serialize<S: Serializer>(v: &Option<ByteCounters>, s: S) -> Result<S::Ok, S::Error> {
            v.map(Column).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<ByteCounters>, D::Error> {
            Ok(Option::<Column>::deserialize(d)?.map(|Column(b)| b))
        }
    }

    #[derive(Serialize, Deserialize)]
    #[serde(remote = "Resource")]
    struct ResourceColumn {
        idle: bool,
        since: Option<u64>,
        quiet_windows: u32,
        last_delta: Option<u64>,
        no_device: bool,
    }

    /// `Option<Sample>` through [`SampleColumn`] (serde's `with` does not reach inside an
    /// `Option`).
    mod optional_sample {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        use super::{Sample, SampleColumn};

        #[derive(Serialize, Deserialize)]
        struct Column(#[serde(with = "SampleColumn")] Sample);

        pub fn serialize<S: Serializer>(v: &Option<Sample>, s: S) -> Result<S::Ok, S::Error> {
            v.map(Column).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Sample>, D::Error> {
            Ok(Option::<Column>::deserialize(d)?.map(|Column(s)| s))
        }
    }

    pub fn encode(u: &Usage) -> String {
        let mut out = Vec::new();
        match UsageColumn::serialize(u, &mut serde_json::Serializer::new(&mut out)) {
            Ok(()) => String::from_utf8(out).unwrap_or_else(|_| "{}".into()),
            Err(_) => "{}".into(),
        }
    }

    /// A column we cannot read costs only the idle history, never the row.
    pub fn decode(text: &str) -> Usage {
        UsageColumn::deserialize(&mut serde_json::Deserializer::from_str(text)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Entry, EntryType};

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("vmwatch-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("master.db")
    }

    #[test]
    fn effects_survive_reopen_and_are_readable() {
        let path = temp_db("reopen");
        let vm = Vm {
            node_id: "hv1".into(),
            uuid: "u1".into(),
            name: "vm1".into(),
            state: "running".into(),
            reason: "booted".into(),
            state_since: 5,
            updated_at: 6,
            usage: Default::default(),
            duplicate: false,
            last_state: Some("running".into()),
            unknown_since: Some(u64::MAX >> 1),
            unknown_reason: Some("node-down".into()),
        };
        let entry = Entry {
            received_at: 1,
            event_ts: 2,
            node_id: "hv1".into(),
            uuid: "u1".into(),
            name: "vm1".into(),
            kind: EntryType::Lifecycle,
            event: "started".into(),
            detail: "booted".into(),
            state: "running".into(),
        };
        {
            let mut store = Store::open(&path).unwrap();
            let ids = store
                .commit(&[
                    Effect::UpsertVm(vm.clone()),
                    Effect::Journal(entry.clone()),
                    Effect::Journal(entry),
                ])
                .unwrap();
            assert_eq!(ids, [1, 2]);
        }
        let store = Store::open(&path).unwrap();
        let inv = store.load_inventory().unwrap();
        assert_eq!(inv.vms["hv1"]["u1"], vm);
        let reader = Reader::open(&path).unwrap();
        assert_eq!(reader.vm("u1").unwrap(), vec![vm]);
        let f = EventFilter {
            after: 1,
            limit: 10,
            ..Default::default()
        };
        assert_eq!(
            reader
                .events(&f)
                .unwrap()
                .iter()
                .map(|e| e.id)
                .collect::<Vec<_>>(),
            [2]
        );
        let (rows, total) = reader
            .vms(&VmFilter {
                state: Some("shutoff".into()),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!((rows.len(), total), (0, 0));
    }

    fn entry_at(received_at: u64) -> Entry {
        Entry {
            received_at,
            event_ts: received_at,
            node_id: "hv1".into(),
            uuid: String::new(),
            name: String::new(),
            kind: EntryType::Node,
            event: "up".into(),
            detail: String::new(),
            state: String::new(),
        }
    }

    #[test]
    fn retention_purges_old_delivered_entries_only() {
        let path = temp_db("retention");
        let mut store = Store::open(&path).unwrap();
        const DAY: u64 = 86_400_000;
        let now = 400 * DAY;
        // Delivered (no outbox) entries: 100 and 10 days old.
        store
            .commit(&[
                Effect::Journal(entry_at(now - 100 * DAY)),
                Effect::Journal(entry_at(now - 10 * DAY)),
            ])
            .unwrap();
        // An undelivered entry 100 days old.
        store.enable_outbox();
        let pending = store
            .commit(&[Effect::Journal(entry_at(now - 100 * DAY))])
            .unwrap();
        let cutoff = crate::retention::cutoff(now, 90).unwrap();
        assert_eq!(store.purge_journal(cutoff).unwrap(), 1);
        let reader = Reader::open(&path).unwrap();
        let ids: Vec<i64> = reader
            .events(&EventFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            [2, pending[0]],
            "the 10-day-old and the undelivered entries stay"
        );
    }

    /// Points are appended to their VM's, node's and day's row, read back in order across
    /// days and nodes, and whole days go at retention.
    #[test]
    fn activity_is_appended_per_day_and_purged_by_day() {
        use crate::activity::{Point, DAY_MS};
        let path = temp_db("activity");
        let mut store = Store::open(&path).unwrap();
        let at = |ts: u64, tx: u64| Point {
            ts,
            window_ms: 600_000,
            deltas: [
                Some(tx),
                Some(1),
                None,
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
                Some(8),
            ],
            idle_net: tx == 0,
            idle_disk: false,
        };
        let point = |node: &str, p: Point| Effect::Activity {
            node_id: node.into(),
            uuid: "u1".into(),
            point: p,
        };
        let day = 20_000 * DAY_MS;
        store
            .commit(&[
                point("hv1", at(day - 600_000, 9)),
                point("hv1", at(day + 600_000, 0)),
                point("hv1", at(day + 1_200_000, 2)),
                point("hv2", at(day + 600_000, 1)),
            ])
            .unwrap();
        let reader = Reader::open(&path).unwrap();
        let all = reader.activity("u1", None, 19_999, 20_000).unwrap();
        let shape: Vec<(String, usize)> = all.iter().map(|(n, p)| (n.clone(), p.len())).collect();
        assert_eq!(
            shape,
            [("hv1".into(), 1), ("hv1".into(), 2), ("hv2".into(), 1)]
        );
        assert_eq!(all[1].1, [at(day + 600_000, 0), at(day + 1_200_000, 2)]);
        assert_eq!(
            reader.activity("u1", Some("hv2"), 0, 30_000).unwrap().len(),
            1
        );
        assert_eq!(store.purge_activity(20_000).unwrap(), 1, "the day before");
        assert_eq!(reader.activity("u1", None, 0, 30_000).unwrap().len(), 2);
    }

    /// With the bus on, an old entry the broker has not confirmed stays; once the cursor passes
    /// it, it goes. The cursor starts at the journal's end and never moves back.
    #[test]
    fn retention_keeps_what_the_bus_has_not_confirmed() {
        let path = temp_db("retention-bus");
        let mut store = Store::open(&path).unwrap();
        const DAY: u64 = 86_400_000;
        let now = 400 * DAY;
        let before = store
            .commit(&[Effect::Journal(entry_at(now - 100 * DAY))])
            .unwrap();
        store.enable_bus().unwrap();
        let mut cursor = BusCursor::open(&path).unwrap();
        assert_eq!(cursor.position().unwrap(), before[0], "starts at the end");
        let old = store
            .commit(&[
                Effect::Journal(entry_at(now - 100 * DAY)),
                Effect::Journal(entry_at(now - 100 * DAY)),
            ])
            .unwrap();
        assert_eq!(cursor.after(before[0], 10).unwrap().len(), 2);
        let cutoff = crate::retention::cutoff(now, 90).unwrap();
        assert_eq!(
            store.purge_journal(cutoff).unwrap(),
            1,
            "only the one before the bus"
        );
        cursor.advance(old[0]).unwrap();
        cursor.advance(before[0]).unwrap();
        assert_eq!(cursor.position().unwrap(), old[0], "never moves back");
        assert_eq!(store.purge_journal(cutoff).unwrap(), 1);
        let left: Vec<i64> = cursor.after(0, 10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(left, [old[1]], "the unconfirmed entry stays");
        assert_eq!(cursor.journal_end().unwrap(), old[1]);
    }

    /// A schema-2 database (with the received_at index) opens as the current schema: the index
    /// is gone, the bus cursor's table exists and the rows are kept.
    #[test]
    fn schema_2_is_upgraded() {
        let path = temp_db("schema2");
        let mut store = Store::open(&path).unwrap();
        store.commit(&[Effect::Journal(entry_at(5))]).unwrap();
        store
            .conn
            .execute_batch(
                "CREATE INDEX journal_received ON journal(received_at); DROP TABLE bus_cursor; \
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let index: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'journal_received'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 0);
        let bus: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'bus_cursor'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(bus, 1);
        let journal: i64 = store
            .conn
            .query_row("SELECT count(*) FROM journal", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let path = temp_db("schema");
        Store::open(&path)
            .unwrap()
            .conn
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn usage_column_round_trips_and_survives_garbage() {
        use crate::idle::{Resource, Sample, Usage};
        let usage = Usage {
            sample: Some(Sample {
                ts: 1,
                tx_pkts: 2,
                wr_reqs: 3,
                rx_pkts: 4,
                rd_reqs: 5,
                cpu_time_ns: 6,
                bytes: Some(crate::idle::ByteCounters {
                    tx: 9,
                    rx: 10,
                    rd: 11,
                    wr: 12,
                }),
            }),
            nics: 1,
            disks: 2,
            net: Resource {
                idle: true,
                since: Some(7),
                quiet_windows: 8,
                last_delta: Some(0),
                no_device: false,
            },
            disk: Resource {
                no_device: true,
                ..Resource::default()
            },
            last_window_ms: Some(600_000),
        };
        assert_eq!(usage_column::decode(&usage_column::encode(&usage)), usage);
        assert_eq!(usage_column::decode("{not json"), Usage::default());
        // The stored format is the one earlier versions wrote (derived from `Usage` itself).
        let stored = r#"{"sample":null,"nics":0,"disks":0,"net":{"idle":false,"since":null,"quiet_windows":0,"last_delta":null,"no_device":false},"disk":{"idle":false,"since":null,"quiet_windows":0,"last_delta":null,"no_device":false},"last_window_ms":null}"#;
        assert_eq!(usage_column::encode(&Usage::default()), stored);
        assert_eq!(usage_column::decode(stored), Usage::default());
        // A sample stored before byte counters were kept reads with none.
        let old = r#"{"sample":{"ts":1,"tx_pkts":2,"wr_reqs":3,"rx_pkts":4,"rd_reqs":5,"cpu_time_ns":6},"nics":1,"disks":1,"net":{"idle":false,"since":null,"quiet_windows":0,"last_delta":null,"no_device":false},"disk":{"idle":false,"since":null,"quiet_windows":0,"last_delta":null,"no_device":false},"last_window_ms":null}"#;
        let read = usage_column::decode(old);
        assert_eq!(read.sample.map(|s| (s.tx_pkts, s.bytes)), Some((2, None)));
    }
}
