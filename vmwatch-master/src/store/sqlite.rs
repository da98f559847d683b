//! The SQLite backend (WAL): the embedded default. Its schema history (`user_version` 1 to 6)
//! and the connection settings of each [`Purpose`].

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};

use super::{Cell, DbError, Purpose, Row, Value, SCHEMA_VERSION};

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

/// `cache_size` in KiB when negative (SQLite's convention): 16 MiB.
const WRITER_CACHE_KIB: i64 = -16_384;
/// Pages of WAL before an automatic checkpoint (at 4 KiB a page: 64 MiB).
const WAL_CHECKPOINT_PAGES: i64 = 16_384;

/// A connection to the SQLite file.
pub struct Conn {
    conn: Connection,
}

impl Conn {
    pub fn open(path: &Path, purpose: Purpose) -> Result<Conn, DbError> {
        let conn = match purpose {
            Purpose::Writer
            | Purpose::Outbox
            | Purpose::Bus
            | Purpose::Migrate
            | Purpose::Lease => Connection::open(path)?,
            Purpose::Registry => Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
            Purpose::Reader => Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
        };
        match purpose {
            Purpose::Writer => {
                tune_writer(&conn)?;
                conn.busy_timeout(Duration::from_secs(5))?;
                let mut c = Conn { conn };
                c.migrate()?;
                return Ok(c);
            }
            Purpose::Outbox | Purpose::Bus => {
                conn.busy_timeout(Duration::from_secs(10))?;
                conn.pragma_update(None, "synchronous", "FULL")?;
            }
            Purpose::Registry | Purpose::Reader | Purpose::Migrate | Purpose::Lease => {
                conn.busy_timeout(Duration::from_secs(5))?;
            }
        }
        Ok(Conn { conn })
    }

    /// Schema 1's tables, then each migration, in one transaction.
    fn migrate(&mut self) -> Result<(), DbError> {
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(DbError::NewerSchema { found: version });
        }
        let tx = self.conn.transaction()?;
        let fresh = version == 0
            && tx.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'nodes'",
                [],
                |r| r.get::<_, i64>(0),
            )? == 0;
        tx.execute_batch(SCHEMA)?;
        for (to, sql) in [
            (2, MIGRATE_TO_2),
            (3, MIGRATE_TO_3),
            (4, MIGRATE_TO_4),
            (5, MIGRATE_TO_5),
            (6, MIGRATE_TO_6),
            // Schema 7 is the leader lease, which only PostgreSQL has (HA needs it).
            (7, ""),
        ] {
            if version < to {
                tx.execute_batch(sql)?;
            }
        }
        if version < 6 {
            // A database from before per-node keys: every node it knows is enrolled (no
            // journal entry: they were there before), and the fleet key keeps working until
            // the operator says `allow_fleet_transport=no` (SPEC §10, "Upgrade").
            if !fresh {
                tx.execute(
                    "INSERT OR IGNORE INTO enrollment (node_id, enrolled_at, journaled) \
                     SELECT node_id, ?1, 'enrolled' FROM nodes",
                    rusqlite::params![vmwatch_common::time::now_ms() as i64],
                )?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('fleet_transport', ?1)",
                rusqlite::params![!fresh],
            )?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(())
    }

    pub fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
    }

    /// Runs an insert; returns the new row's rowid.
    pub fn insert(&mut self, sql: &str, args: &[Value<'_>]) -> Result<i64, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.insert(rusqlite::params_from_iter(args.iter()))?)
    }

    pub fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut cells = Vec::with_capacity(columns);
            for i in 0..columns {
                cells.push(match row.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    // We never store reals; one read as an integer keeps the row readable.
                    ValueRef::Real(v) => Cell::Int(v as i64),
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Cell::Bytes(b.to_vec()),
                });
            }
            out.push(Row(cells));
        }
        Ok(out)
    }

    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.conn.execute_batch(sql)?)
    }

    /// The rusqlite connection (SQLite-only tests and the benchmark's reference).
    pub fn raw(&self) -> &Connection {
        &self.conn
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
            Value::List(_) => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    "SQLite has no array parameters".into(),
                ))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Conn as AnyConn, Effect, Store};
    use crate::rules::{Entry, EntryType};

    fn temp_db(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmwatch-sqlite-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("master.db")
    }

    fn raw(store: &mut Store) -> &rusqlite::Connection {
        match store.conn() {
            AnyConn::Sqlite(c) => c.raw(),
            AnyConn::Postgres(_) => unreachable!("a sqlite path"),
        }
    }

    fn entry() -> Entry {
        Entry {
            received_at: 5,
            event_ts: 5,
            node_id: "hv1".into(),
            uuid: String::new(),
            name: String::new(),
            kind: EntryType::Node,
            event: "up".into(),
            detail: String::new(),
            state: String::new(),
        }
    }

    /// A schema-2 database (with the received_at index) opens as the current schema: the index
    /// is gone, the bus cursor's table exists and the rows are kept.
    #[test]
    fn schema_2_is_upgraded() {
        let path = temp_db("schema2");
        let mut store = Store::open(&path).unwrap();
        store.commit(&[Effect::Journal(entry())]).unwrap();
        raw(&mut store)
            .execute_batch(
                "CREATE INDEX journal_received ON journal(received_at); DROP TABLE bus_cursor; \
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        drop(store);
        let mut store = Store::open(&path).unwrap();
        let conn = raw(&mut store);
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(count("PRAGMA user_version"), super::SCHEMA_VERSION);
        assert_eq!(
            count("SELECT count(*) FROM sqlite_master WHERE name = 'journal_received'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM sqlite_master WHERE name = 'bus_cursor'"),
            1
        );
        assert_eq!(count("SELECT count(*) FROM journal"), 1);
    }
}
