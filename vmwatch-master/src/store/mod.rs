//! The master's database: one interface ([`Store`], [`Outbox`], [`BusCursor`], [`Registry`],
//! [`Reader`]) over two backends (SPEC §12), SQLite (`sqlite.rs`, embedded, the default) and
//! PostgreSQL (`postgres.rs`). The only module that contains SQL.
//!
//! Every statement is written once, in SQLite's `?N` placeholder form, and runs unchanged on
//! both backends (the PostgreSQL module rewrites `?N` as `$N`); [`Dialect`] chooses the few that
//! are not shared: on PostgreSQL the commit's statements that write many rows at once
//! (`*_MANY_PG`: a statement per row would be a round trip to the server each), among them
//! appending bytes to a blob, which the two say differently. Booleans are stored as integers on both,
//! so a row reads the same from either. The core thread owns the one writing [`Store`]; API
//! handlers use [`Reader`]s on their own connections, which see every committed transaction and
//! never block the writer.

mod lease;
mod migrate;
mod postgres;
mod sqlite;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::rules::{Effect, Entry, Inventory, Node, Unknown, Vm};

pub use self::lease::{Claim, Lease};
pub use self::migrate::{migrate, Copied};
pub use self::postgres::{placeholders as postgres_placeholders, Target as PostgresTarget};
pub use self::sqlite::tune_writer;

/// The schema version both backends are at (SQLite's `user_version`, PostgreSQL's
/// `settings.schema_version`).
pub const SCHEMA_VERSION: i64 = 7;

/// Where the master's state lives (`database=`).
#[derive(Clone)]
pub enum Database {
    /// `sqlite:///var/lib/vmwatch/master.db` (or `db_path=`).
    Sqlite(PathBuf),
    /// A libpq URL.
    Postgres(Arc<PostgresTarget>),
}

impl Database {
    /// Parses `database=`: `sqlite://` followed by an absolute path, or a `postgres://` /
    /// `postgresql://` URL. `password_file` (`database_password_file=`) gives PostgreSQL's
    /// password when the URL has none.
    pub fn parse(text: &str, password_file: Option<&Path>) -> Result<Database, String> {
        if let Some(path) = text.strip_prefix("sqlite://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "database={text}: a sqlite:// URL takes an absolute path, as in sqlite:///var/lib/vmwatch/master.db"
                ));
            }
            if password_file.is_some() {
                return Err("database_password_file is only for a PostgreSQL database".into());
            }
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return PostgresTarget::parse(text, password_file)
                .map(|t| Database::Postgres(Arc::new(t)));
        }
        Err(format!(
            "database={}: expected sqlite:///path or postgres://user@host/dbname",
            postgres::mask(text)
        ))
    }

    /// With a PostgreSQL backend, sessions named `name` (`application_name`).
    pub fn named(&self, name: &str) -> Database {
        match self {
            Database::Sqlite(p) => Database::Sqlite(p.clone()),
            Database::Postgres(t) => Database::Postgres(Arc::new(t.named(name))),
        }
    }

    /// The SQLite file, if that is the backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Database::Sqlite(p) => Some(p),
            Database::Postgres(_) => None,
        }
    }
}

/// Shown with any password masked: in `--check-config`, logs and errors.
impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            Database::Postgres(t) => write!(f, "{t}"),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&Path> for Database {
    fn from(p: &Path) -> Database {
        Database::Sqlite(p.to_owned())
    }
}

impl From<&PathBuf> for Database {
    fn from(p: &PathBuf) -> Database {
        Database::Sqlite(p.clone())
    }
}

impl From<&Database> for Database {
    fn from(d: &Database) -> Database {
        d.clone()
    }
}

/// What a backend's driver said.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// Not marked as the source: its text already holds the cause, once.
    #[error("{}", postgres::describe(.0))]
    Postgres(::postgres::Error),
    /// A row that does not have the shape the statement promised.
    #[error("column {column}: {what}")]
    Column { column: usize, what: &'static str },
    #[error("{0}")]
    Config(String),
    /// The database was written by a newer master.
    #[error("schema version {found} is newer than this master understands ({SCHEMA_VERSION})")]
    NewerSchema { found: i64 },
}

impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

/// A database error, with what we were doing. Its text holds the driver's (no separate
/// `source()`, so a log of the error chain says it once).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {database} {purpose}: {error}")]
    Open {
        /// Shown masked.
        database: String,
        /// `for writing`, `for the outbox`, `for reading`.
        purpose: &'static str,
        error: DbError,
    },
    #[error("database {database} has schema version {found}, newer than this master understands ({supported})")]
    NewerSchema {
        database: String,
        found: i64,
        supported: i64,
    },
    #[error("{step}: {error}")]
    Database { step: &'static str, error: DbError },
    /// A leader's write after another master took the lease over: rolled back (SPEC §13).
    #[error("this master's leader lease (epoch {mine}) was taken over (epoch {current}); nothing was written")]
    Fenced { mine: i64, current: i64 },
}

impl StoreError {
    /// Whether the leader lease was lost (the master must step down).
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }
}

/// Inside a leader's write transaction: its epoch is still the lease's, and stays so until the
/// transaction ends (the row is share-locked, so a takeover waits for this commit).
fn check_fence(conn: &mut Conn, fence: Option<i64>) -> Result<(), StoreError> {
    let Some(mine) = fence else {
        return Ok(());
    };
    let current = conn
        .query_int("SELECT epoch FROM leader_lease WHERE id = 1 FOR SHARE", &[])
        .map_err(ctx("check the leader lease"))?;
    if current == mine {
        Ok(())
    } else {
        Err(StoreError::Fenced { mine, current })
    }
}

fn ctx(step: &'static str) -> impl Fn(DbError) -> StoreError {
    move |error| StoreError::Database { step, error }
}

/// Which SQL a backend speaks, for the statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A statement's argument.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
    /// An array, for PostgreSQL's `unnest` (one statement writing many rows); SQLite refuses it.
    List(&'a [Value<'a>]),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u16> for Value<'_> {
    fn from(v: u16) -> Self {
        Value::Int(v.into())
    }
}
impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}
impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}
impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Bytes(v)
    }
}
impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// A statement's arguments: `args![a, b]` is `&[Value::from(a), Value::from(b)]`.
macro_rules! args {
    ($($v:expr),* $(,)?) => { &[$($crate::store::Value::from($v)),*][..] };
}
#[allow(unused_imports)]
pub(crate) use args;

/// One column of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Cell {
    /// The cell as an argument (copying rows between databases).
    pub fn as_value(&self) -> Value<'_> {
        match self {
            Cell::Null => Value::Null,
            Cell::Int(v) => Value::Int(*v),
            Cell::Text(s) => Value::Text(s),
            Cell::Bytes(b) => Value::Bytes(b),
        }
    }
}

/// A result row; the getters take the column's value out.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    fn take(&mut self, column: usize) -> Result<Cell, DbError> {
        self.0
            .get_mut(column)
            .map(|c| std::mem::replace(c, Cell::Null))
            .ok_or(DbError::Column {
                column,
                what: "missing",
            })
    }
    pub fn opt_int(&mut self, column: usize) -> Result<Option<i64>, DbError> {
        match self.take(column)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(v)),
            _ => Err(DbError::Column {
                column,
                what: "not an integer",
            }),
        }
    }
    pub fn int(&mut self, column: usize) -> Result<i64, DbError> {
        self.opt_int(column)?.ok_or(DbError::Column {
            column,
            what: "null",
        })
    }
    /// An integer column that holds a time or count (never negative when we wrote it).
    pub fn u64(&mut self, column: usize) -> Result<u64, DbError> {
        Ok(self.int(column)?.max(0) as u64)
    }
    pub fn opt_u64(&mut self, column: usize) -> Result<Option<u64>, DbError> {
        Ok(self.opt_int(column)?.map(|v| v.max(0) as u64))
    }
    pub fn bool(&mut self, column: usize) -> Result<bool, DbError> {
        Ok(self.int(column)? != 0)
    }
    pub fn opt_text(&mut self, column: usize) -> Result<Option<String>, DbError> {
        match self.take(column)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s)),
            _ => Err(DbError::Column {
                column,
                what: "not text",
            }),
        }
    }
    pub fn text(&mut self, column: usize) -> Result<String, DbError> {
        self.opt_text(column)?.ok_or(DbError::Column {
            column,
            what: "null",
        })
    }
    /// A blob column (SQLite's `||` may have made text of it: the bytes are the same).
    pub fn bytes(&mut self, column: usize) -> Result<Vec<u8>, DbError> {
        match self.take(column)? {
            Cell::Bytes(b) => Ok(b),
            Cell::Text(s) => Ok(s.into_bytes()),
            _ => Err(DbError::Column {
                column,
                what: "not bytes",
            }),
        }
    }
}

/// What a connection is for: its error messages, and how it is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Writer,
    Outbox,
    Bus,
    Registry,
    Reader,
    Migrate,
    Lease,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Writer => "for writing",
            Purpose::Outbox => "for the outbox",
            Purpose::Bus => "for the event bus",
            Purpose::Registry => "for the node registry",
            Purpose::Reader => "for reading",
            Purpose::Migrate => "to migrate",
            Purpose::Lease => "for the leader lease",
        }
    }
}

/// A connection to either backend: the one interface the stores below are written over.
/// (A handful of these live for the process's lifetime: their size does not matter.)
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Sqlite(sqlite::Conn),
    Postgres(postgres::Conn),
}

impl Conn {
    /// Opens a connection. Only [`Purpose::Writer`] creates or migrates the schema.
    pub fn open(db: &Database, purpose: Purpose) -> Result<Conn, StoreError> {
        let open_error = |source| match source {
            DbError::NewerSchema { found } => StoreError::NewerSchema {
                database: db.to_string(),
                found,
                supported: SCHEMA_VERSION,
            },
            error => StoreError::Open {
                database: db.to_string(),
                purpose: purpose.as_str(),
                error,
            },
        };
        match db {
            Database::Sqlite(path) => sqlite::Conn::open(path, purpose)
                .map(Conn::Sqlite)
                .map_err(open_error),
            Database::Postgres(target) => postgres::Conn::open(target.clone(), purpose)
                .map(Conn::Postgres)
                .map_err(open_error),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs one statement (prepared once per connection); returns the rows it changed.
    pub fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        match self {
            Conn::Sqlite(c) => c.execute(sql, args),
            Conn::Postgres(c) => c.execute(sql, args),
        }
    }

    /// Runs one query; returns its rows.
    pub fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError> {
        match self {
            Conn::Sqlite(c) => c.query(sql, args),
            Conn::Postgres(c) => c.query(sql, args),
        }
    }

    /// The first row of a query, if any.
    pub fn query_row(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// Inserts one row; returns its id: `sqlite` (no `RETURNING`) then `last_insert_rowid()`
    /// on SQLite, `postgres` (the same insert with `RETURNING id`) on PostgreSQL.
    pub fn insert(
        &mut self,
        sqlite: &str,
        postgres: &str,
        args: &[Value<'_>],
    ) -> Result<i64, DbError> {
        match self {
            Conn::Sqlite(c) => c.insert(sqlite, args),
            Conn::Postgres(_) => self.query_int(postgres, args),
        }
    }

    /// A query's first column of its first row as an integer (`count(*)`, `coalesce(…)`).
    pub fn query_int(&mut self, sql: &str, args: &[Value<'_>]) -> Result<i64, DbError> {
        match self.query_row(sql, args)? {
            Some(mut row) => row.int(0),
            None => Err(DbError::Column {
                column: 0,
                what: "no row",
            }),
        }
    }

    /// Runs statements without arguments (schema, `BEGIN`).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Conn::Sqlite(c) => c.batch(sql),
            Conn::Postgres(c) => c.batch(sql),
        }
    }

    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back otherwise.
    pub fn transaction<T>(
        &mut self,
        step: &'static str,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.batch("BEGIN").map_err(ctx(step))?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.batch("COMMIT") {
                    // A failed COMMIT leaves SQLite's transaction open; PostgreSQL's is gone.
                    let _ = self.batch("ROLLBACK");
                    return Err(ctx(step)(e));
                }
                Ok(v)
            }
            Err(e) => {
                // The connection may be the thing that failed: nothing to undo then.
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

/// Appends a point to its day's row (`activity::encode`), in SQLite's words.
pub const ACTIVITY_APPEND: &str = "\
     INSERT INTO activity (uuid, node_id, day, points) VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (uuid, node_id, day) DO UPDATE SET \
     points = CAST(points || excluded.points AS BLOB)";
/// The same in PostgreSQL's words (`bytea || bytea` is a bytea), for many points in one
/// statement (see [`NODE_UPSERT_MANY_PG`]); no two of the same uuid, node and day.
pub const ACTIVITY_APPEND_MANY_PG: &str = "\
     INSERT INTO activity (uuid, node_id, day, points) \
     SELECT * FROM unnest(?1::text[], ?2::text[], ?3::bigint[], ?4::bytea[]) \
     ON CONFLICT (uuid, node_id, day) DO UPDATE SET \
     points = activity.points || excluded.points";

/// The `ON CONFLICT` clause of every node row write: a whole-row replacement.
macro_rules! node_update {
    () => {
        "ON CONFLICT (node_id) DO UPDATE SET up = excluded.up, libvirt_up = excluded.libvirt_up, \
         first_seen = excluded.first_seen, last_seen = excluded.last_seen, \
         boot = excluded.boot, boot_ts = excluded.boot_ts, last_seq = excluded.last_seq, \
         version = excluded.version, hostname = excluded.hostname, \
         libvirt_version = excluded.libvirt_version, domains = excluded.domains, \
         gaps = excluded.gaps, lost = excluded.lost, \
         libvirt_down_since = excluded.libvirt_down_since, \
         superseded = excluded.superseded"
    };
}
/// The `ON CONFLICT` clause of every VM row write: a whole-row replacement.
macro_rules! vm_update {
    () => {
        "ON CONFLICT (node_id, uuid) DO UPDATE SET name = excluded.name, state = excluded.state, \
         reason = excluded.reason, \
         state_since = excluded.state_since, updated_at = excluded.updated_at, \
         idle_net = excluded.idle_net, idle_disk = excluded.idle_disk, \
         duplicate = excluded.duplicate, usage = excluded.usage, \
         last_state = excluded.last_state, unknown_since = excluded.unknown_since, \
         unknown_reason = excluded.unknown_reason"
    };
}
/// The core's row writes, public so that the benchmark's raw references run the very same
/// statements. Rows are upserts, not replaced: a row that exists is updated in place, so the
/// indexes on columns that did not change are not rewritten.
pub const NODE_UPSERT: &str = concat!(
    "INSERT INTO nodes (node_id, up, libvirt_up, first_seen, last_seen, boot, boot_ts, \
     last_seq, version, hostname, libvirt_version, domains, gaps, lost, libvirt_down_since, superseded) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) ",
    node_update!()
);
pub const VM_UPSERT: &str = concat!(
    "INSERT INTO vms (node_id, uuid, name, state, reason, state_since, updated_at, \
     idle_net, idle_disk, duplicate, usage, last_state, unknown_since, unknown_reason) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) ",
    vm_update!()
);
/// [`NODE_UPSERT`] of many rows in one statement, on PostgreSQL: each argument is one column
/// as an array. Row by row, every upsert is a round trip to the server: a 10,000-node setup
/// (500,000 VM rows and their journal entries) took 329 s that way, and 14 s this way.
pub const NODE_UPSERT_MANY_PG: &str = concat!(
    "INSERT INTO nodes (node_id, up, libvirt_up, first_seen, last_seen, boot, boot_ts, \
     last_seq, version, hostname, libvirt_version, domains, gaps, lost, libvirt_down_since, superseded) \
     SELECT * FROM unnest(?1::text[], ?2::bigint[], ?3::bigint[], ?4::bigint[], ?5::bigint[], \
     ?6::text[], ?7::bigint[], ?8::bigint[], ?9::text[], ?10::text[], ?11::text[], ?12::bigint[], \
     ?13::bigint[], ?14::bigint[], ?15::bigint[], ?16::text[]) ",
    node_update!()
);
/// [`VM_UPSERT`] of many rows in one statement, on PostgreSQL (see [`NODE_UPSERT_MANY_PG`]).
pub const VM_UPSERT_MANY_PG: &str = concat!(
    "INSERT INTO vms (node_id, uuid, name, state, reason, state_since, updated_at, \
     idle_net, idle_disk, duplicate, usage, last_state, unknown_since, unknown_reason) \
     SELECT * FROM unnest(?1::text[], ?2::text[], ?3::text[], ?4::text[], ?5::text[], \
     ?6::bigint[], ?7::bigint[], ?8::bigint[], ?9::bigint[], ?10::bigint[], ?11::text[], \
     ?12::text[], ?13::bigint[], ?14::text[]) ",
    vm_update!()
);
/// The most rows one [`NODE_UPSERT_MANY_PG`], [`VM_UPSERT_MANY_PG`],
/// [`JOURNAL_INSERT_MANY_PG`] or [`ACTIVITY_APPEND_MANY_PG`] writes (about 300 KB of
/// arguments).
pub const ROWS_PER_STATEMENT: usize = 1000;
/// Appends a journal entry; on SQLite its id is then `last_insert_rowid()`. A `RETURNING`
/// clause makes SQLite keep a statement journal, copying every page the insert touches
/// (the raw SQLite reference of `vmwatch-loadgen events` went from about 76,000 to 93,000
/// events/s without it).
pub const JOURNAL_INSERT: &str = "\
     INSERT INTO journal (received_at, event_ts, node_id, uuid, name, type, event, detail, state) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
/// [`JOURNAL_INSERT`] answering the new id, on PostgreSQL.
pub const JOURNAL_INSERT_RETURNING: &str = "\
     INSERT INTO journal (received_at, event_ts, node_id, uuid, name, type, event, detail, state) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id";
/// [`JOURNAL_INSERT`] of many entries in one statement, on PostgreSQL (see
/// [`NODE_UPSERT_MANY_PG`]): ids are given in the arrays' order, so the k-th smallest id
/// returned is the k-th entry's.
pub const JOURNAL_INSERT_MANY_PG: &str = "\
     INSERT INTO journal (received_at, event_ts, node_id, uuid, name, type, event, detail, state) \
     SELECT received_at, event_ts, node_id, uuid, name, type, event, detail, state \
     FROM unnest(?1::bigint[], ?2::bigint[], ?3::text[], ?4::text[], ?5::text[], ?6::text[], \
     ?7::text[], ?8::text[], ?9::text[]) WITH ORDINALITY \
     AS e(received_at, event_ts, node_id, uuid, name, type, event, detail, state, n) \
     ORDER BY n RETURNING id";
pub const OUTBOX_INSERT: &str = "INSERT INTO outbox (journal_id) VALUES (?1)";
/// [`OUTBOX_INSERT`] of every id of a commit in one statement, on PostgreSQL.
pub const OUTBOX_INSERT_MANY_PG: &str =
    "INSERT INTO outbox (journal_id) SELECT unnest(?1::bigint[])";

/// The columns every node, VM and journal read lists, in the order the `*_from_row` read.
const NODE_COLUMNS: &str = "node_id, up, libvirt_up, first_seen, last_seen, boot, boot_ts, \
     last_seq, version, hostname, libvirt_version, domains, gaps, lost, libvirt_down_since, superseded";
const VM_COLUMNS: &str = "node_id, uuid, name, state, reason, state_since, updated_at, usage, \
     duplicate, last_state, unknown_since, unknown_reason";
const JOURNAL_COLUMNS: &str = "journal.id, journal.received_at, journal.event_ts, \
     journal.node_id, journal.uuid, journal.name, journal.type, journal.event, journal.detail, \
     journal.state";

/// The writing side.
pub struct Store {
    conn: Conn,
    /// Whether journal entries also go to the webhook outbox (`panel_url` is set).
    outbox: bool,
    /// Whether retention waits for the event bus (`bus_url` is set).
    bus: bool,
    /// The leader lease's epoch every write checks (HA), or none.
    fence: Option<i64>,
}

impl Store {
    /// Opens (creating if needed) the database and brings its schema up to date.
    pub fn open(db: impl Into<Database>) -> Result<Store, StoreError> {
        Ok(Store {
            conn: Conn::open(&db.into(), Purpose::Writer)?,
            outbox: false,
            bus: false,
            fence: None,
        })
    }

    /// Makes every write transaction check that the leader lease still has `epoch`.
    pub fn fence(&mut self, epoch: i64) {
        self.fence = Some(epoch);
    }

    /// The connection (the benchmarks' references and the migration use it directly).
    pub fn conn(&mut self) -> &mut Conn {
        &mut self.conn
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
                "INSERT INTO bus_cursor (id, journal_id) \
                 SELECT 1, coalesce(max(id), 0) FROM journal WHERE true ON CONFLICT (id) DO NOTHING",
                &[],
            )
            .map_err(ctx("create the bus cursor"))?;
        self.bus = true;
        Ok(())
    }

    /// Journal entries stored.
    pub fn journal_size(&mut self) -> Result<u64, StoreError> {
        self.conn
            .query_int("SELECT count(*) FROM journal", &[])
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
        let columns = encode_columns(effects);
        self.commit_encoded(effects, &columns)
    }

    /// [`Store::commit`] of a [`Prepared`] batch (its JSON columns already encoded).
    pub fn commit_prepared(&mut self, batch: &Prepared) -> Result<Vec<i64>, StoreError> {
        self.commit_encoded(&batch.effects, &batch.columns)
    }

    fn commit_encoded(
        &mut self,
        effects: &[Effect],
        columns: &[String],
    ) -> Result<Vec<i64>, StoreError> {
        let (outbox, fence) = (self.outbox, self.fence);
        self.conn.transaction("commit", |conn| {
            check_fence(conn, fence)?;
            let ids = apply(conn, effects, columns)?;
            if outbox && !ids.is_empty() {
                if conn.dialect() == Dialect::Postgres {
                    let ids: Vec<Value<'_>> = ids.iter().map(|id| Value::Int(*id)).collect();
                    conn.execute(OUTBOX_INSERT_MANY_PG, &[Value::List(&ids)])
                        .map_err(ctx("write outbox"))?;
                } else {
                    for id in &ids {
                        conn.execute(OUTBOX_INSERT, args![*id])
                            .map_err(ctx("write outbox"))?;
                    }
                }
            }
            Ok(ids)
        })
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
        let (bus, fence) = (self.bus, self.fence);
        self.conn.transaction("purge journal", |conn| {
            check_fence(conn, fence)?;
            conn.execute(
                "DELETE FROM journal WHERE id < coalesce(\
                   (SELECT id FROM journal WHERE received_at >= ?1 ORDER BY id LIMIT 1), \
                   (SELECT max(id) + 1 FROM journal)) \
                 AND id NOT IN (SELECT journal_id FROM outbox) \
                 AND id NOT IN (SELECT journal_id FROM dead_letters) \
                 AND (?2 = 0 OR id <= (SELECT journal_id FROM bus_cursor))",
                args![cutoff as i64, bus],
            )
            .map(|n| n as usize)
            .map_err(ctx("purge journal"))
        })
    }

    /// Deletes activity rows of days before `cutoff_day`; returns how many went.
    pub fn purge_activity(&mut self, cutoff_day: u64) -> Result<usize, StoreError> {
        let fence = self.fence;
        self.conn.transaction("purge activity", |conn| {
            check_fence(conn, fence)?;
            conn.execute(
                "DELETE FROM activity WHERE day < ?1",
                args![cutoff_day as i64],
            )
            .map(|n| n as usize)
            .map_err(ctx("purge activity"))
        })
    }

    /// Loads the inventory the rules decide over.
    pub fn load_inventory(&mut self) -> Result<Inventory, StoreError> {
        let mut inv = Inventory::default();
        let nodes = self
            .conn
            .query(&format!("SELECT {NODE_COLUMNS} FROM nodes"), &[])
            .map_err(ctx("load nodes"))?;
        for row in nodes {
            let n = node_from_row(row).map_err(ctx("load nodes"))?;
            inv.nodes.insert(n.node_id.to_string(), n);
        }
        let vms = self
            .conn
            .query(&format!("SELECT {VM_COLUMNS} FROM vms"), &[])
            .map_err(ctx("load vms"))?;
        let mut by_node: HashMap<String, Vec<Vm>> = HashMap::new();
        for row in vms {
            let mut vm = vm_from_row(row).map_err(ctx("load vms"))?;
            // One shared id per node, as the rules make them.
            if let Some(node) = inv.nodes.get(&*vm.node_id) {
                vm.node_id = node.node_id.clone();
            }
            let node_id = vm.node_id.clone();
            crate::rules::get_or_insert(&mut by_node, &node_id, Vec::new).push(vm);
        }
        inv.vms = by_node
            .into_iter()
            .map(|(node_id, rows)| (node_id, rows.into_iter().collect()))
            .collect();
        Ok(inv)
    }
}

/// A batch of effects with the JSON columns its rows carry (a VM's `usage`, a node's
/// `superseded`) encoded beforehand: the core prepares the next batch on its thread while the
/// writer commits this one, so the encoding is off the writer's path. No I/O.
pub struct Prepared {
    effects: Vec<Effect>,
    /// Per effect: its encoded column, or empty for effects without one.
    columns: Vec<String>,
}

impl Prepared {
    pub fn new(effects: Vec<Effect>) -> Prepared {
        let columns = encode_columns(&effects);
        Prepared { effects, columns }
    }

    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }
}

fn encode_columns(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            // A list of (string, number) pairs always serialises.
            Effect::UpsertNode(n) => {
                serde_json::to_string(&n.superseded).unwrap_or_else(|_| "[]".into())
            }
            Effect::UpsertVm(vm) => usage_column::encode(&vm.usage),
            _ => String::new(),
        })
        .collect()
}

/// Writes effects inside a transaction; returns the ids given to journal entries. `columns`
/// are [`encode_columns`] of `effects`. On PostgreSQL, row writes, journal entries and
/// activity points go many to a statement ([`RowWrites`]).
fn apply(conn: &mut Conn, effects: &[Effect], columns: &[String]) -> Result<Vec<i64>, StoreError> {
    let mut ids = Vec::new();
    let dialect = conn.dialect();
    let mut rows = RowWrites::default();
    for (effect, column) in effects.iter().zip(columns) {
        match effect {
            Effect::UpsertNode(n) if dialect == Dialect::Postgres => rows.node(conn, n, column)?,
            Effect::UpsertNode(n) => write_node(conn, n, column)?,
            Effect::UpsertVm(vm) if dialect == Dialect::Postgres => rows.vm(conn, vm, column)?,
            Effect::UpsertVm(vm) => write_vm(conn, vm, column)?,
            Effect::RemoveVm { node_id, uuid } => {
                if rows.vms.waits(&(node_id.as_str(), uuid.as_str())) {
                    rows.flush_vms(conn)?;
                }
                conn.execute(
                    "DELETE FROM vms WHERE node_id = ?1 AND uuid = ?2",
                    args![node_id, uuid],
                )
                .map(|_| ())
                .map_err(ctx("remove vm"))?
            }
            Effect::RemoveNode { node_id } => {
                if rows.nodes.waits(&node_id.as_str()) {
                    rows.flush_nodes(conn)?;
                }
                conn.execute("DELETE FROM nodes WHERE node_id = ?1", args![node_id])
                    .map(|_| ())
                    .map_err(ctx("remove node"))?
            }
            Effect::EnrollmentJournaled { node_id, state } => conn
                .execute(
                    "UPDATE enrollment SET journaled = ?2 WHERE node_id = ?1",
                    args![node_id, *state],
                )
                .map(|_| ())
                .map_err(ctx("mark enrollment journaled"))?,
            Effect::Journal(e) if dialect == Dialect::Postgres => {
                rows.journal(conn, e, &mut ids)?
            }
            Effect::Journal(e) => ids.push(write_journal(conn, e)?),
            Effect::Activity {
                node_id,
                uuid,
                point,
            } => {
                let day = crate::activity::day_of(point.ts) as i64;
                let point = crate::activity::encode(point);
                match dialect {
                    Dialect::Postgres => rows.activity(conn, (uuid, node_id, day), point)?,
                    Dialect::Sqlite => conn
                        .execute(ACTIVITY_APPEND, args![uuid, node_id, day, &point])
                        .map(|_| ())
                        .map_err(ctx("write activity"))?,
                }
            }
        }
    }
    rows.flush_nodes(conn)?;
    rows.flush_vms(conn)?;
    rows.flush_journal(conn, &mut ids)?;
    rows.flush_activity(conn)?;
    Ok(ids)
}

/// Node and VM row writes, journal entries and activity points waiting to go to PostgreSQL many
/// to a statement ([`NODE_UPSERT_MANY_PG`], [`VM_UPSERT_MANY_PG`], [`JOURNAL_INSERT_MANY_PG`],
/// [`ACTIVITY_APPEND_MANY_PG`]).
///
/// Each row's writes stay in their order: a row already waiting sends what waits before it is
/// written again (one statement cannot write a row twice) or removed. Journal entries go in
/// their order, so their ids do. Rows of different keys, and the tables, are independent within
/// the transaction, so the rest may go in any order.
#[derive(Default)]
struct RowWrites<'e> {
    nodes: Keyed<&'e str, (&'e Node, &'e str)>,
    vms: Keyed<VmKey<'e>, (&'e Vm, &'e str)>,
    journal: Vec<&'e Entry>,
    /// Activity points by uuid, node id and day, each encoded.
    activity: Keyed<ActivityKey<'e>, Vec<u8>>,
}

/// A VM row's key: node id, uuid.
type VmKey<'e> = (&'e str, &'e str);
/// An activity row's key: uuid, node id, day.
type ActivityKey<'e> = (&'e str, &'e str, i64);

/// Rows waiting for one statement, at most one of each key (one statement cannot write a row
/// twice, nor append to one twice in order).
struct Keyed<K, R> {
    rows: Vec<(K, R)>,
    keys: std::collections::HashSet<K>,
}

impl<K, R> Default for Keyed<K, R> {
    fn default() -> Self {
        Keyed {
            rows: Vec::new(),
            keys: std::collections::HashSet::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Copy, R> Keyed<K, R> {
    /// Adds a row, sending what waits first if its key already does, and after it once a
    /// statement's worth waits.
    fn push(
        &mut self,
        key: K,
        row: R,
        mut send: impl FnMut(&[(K, R)]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.waits(&key) {
            self.flush(&mut send)?;
        }
        self.keys.insert(key);
        self.rows.push((key, row));
        if self.rows.len() >= ROWS_PER_STATEMENT {
            self.flush(send)?;
        }
        Ok(())
    }

    fn waits(&self, key: &K) -> bool {
        self.keys.contains(key)
    }

    fn flush(
        &mut self,
        send: impl FnOnce(&[(K, R)]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        if self.rows.is_empty() {
            return Ok(());
        }
        send(&self.rows)?;
        self.rows.clear();
        self.keys.clear();
        Ok(())
    }
}

fn send_nodes(conn: &mut Conn, rows: &[(&str, (&Node, &str))]) -> Result<(), StoreError> {
    let rows = rows.iter().map(|(_, (n, column))| node_args(n, column));
    execute_many(conn, NODE_UPSERT_MANY_PG, rows).map_err(ctx("write nodes"))
}

fn send_vms(conn: &mut Conn, rows: &[(VmKey<'_>, (&Vm, &str))]) -> Result<(), StoreError> {
    let rows = rows.iter().map(|(_, (vm, column))| vm_args(vm, column));
    execute_many(conn, VM_UPSERT_MANY_PG, rows).map_err(ctx("write vms"))
}

fn send_activity(conn: &mut Conn, rows: &[(ActivityKey<'_>, Vec<u8>)]) -> Result<(), StoreError> {
    let rows = rows.iter().map(|((uuid, node_id, day), point)| {
        [
            Value::Text(uuid),
            Value::Text(node_id),
            Value::Int(*day),
            Value::Bytes(point),
        ]
    });
    execute_many(conn, ACTIVITY_APPEND_MANY_PG, rows).map_err(ctx("write activity"))
}

impl<'e> RowWrites<'e> {
    fn node(&mut self, conn: &mut Conn, n: &'e Node, column: &'e str) -> Result<(), StoreError> {
        self.nodes
            .push(&n.node_id, (n, column), |rows| send_nodes(conn, rows))
    }

    fn vm(&mut self, conn: &mut Conn, vm: &'e Vm, column: &'e str) -> Result<(), StoreError> {
        let key = (&*vm.node_id, &*vm.uuid);
        self.vms
            .push(key, (vm, column), |rows| send_vms(conn, rows))
    }

    /// An encoded point; points of one row and day append in their order.
    fn activity(
        &mut self,
        conn: &mut Conn,
        key: ActivityKey<'e>,
        point: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.activity
            .push(key, point, |rows| send_activity(conn, rows))
    }

    fn flush_nodes(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        self.nodes.flush(|rows| send_nodes(conn, rows))
    }

    fn flush_vms(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        self.vms.flush(|rows| send_vms(conn, rows))
    }

    fn flush_activity(&mut self, conn: &mut Conn) -> Result<(), StoreError> {
        self.activity.flush(|rows| send_activity(conn, rows))
    }

    /// Appends the ids of the entries it sends to `ids`.
    fn journal(
        &mut self,
        conn: &mut Conn,
        e: &'e Entry,
        ids: &mut Vec<i64>,
    ) -> Result<(), StoreError> {
        self.journal.push(e);
        if self.journal.len() >= ROWS_PER_STATEMENT {
            self.flush_journal(conn, ids)?;
        }
        Ok(())
    }

    fn flush_journal(&mut self, conn: &mut Conn, ids: &mut Vec<i64>) -> Result<(), StoreError> {
        if self.journal.is_empty() {
            return Ok(());
        }
        let args = columns(self.journal.iter().map(|e| journal_args(e)));
        let rows = conn
            .query(JOURNAL_INSERT_MANY_PG, &as_lists(&args))
            .map_err(ctx("write journal"))?;
        let mut new: Vec<i64> = rows
            .into_iter()
            .map(|mut row| row.int(0))
            .collect::<Result<_, _>>()
            .map_err(ctx("write journal"))?;
        if new.len() != self.journal.len() {
            return Err(ctx("write journal")(DbError::Column {
                column: 0,
                what: "one id per entry",
            }));
        }
        new.sort_unstable();
        ids.extend(new);
        self.journal.clear();
        Ok(())
    }
}

/// Runs a statement whose arguments are columns as arrays (`unnest`), given its rows.
fn execute_many<'a, const N: usize>(
    conn: &mut Conn,
    sql: &str,
    rows: impl ExactSizeIterator<Item = [Value<'a>; N]>,
) -> Result<(), DbError> {
    let columns = columns(rows);
    conn.execute(sql, &as_lists(&columns)).map(|_| ())
}

/// Rows of arguments as columns.
fn columns<'a, const N: usize>(
    rows: impl ExactSizeIterator<Item = [Value<'a>; N]>,
) -> [Vec<Value<'a>>; N] {
    let mut columns: [Vec<Value<'a>>; N] = std::array::from_fn(|_| Vec::with_capacity(rows.len()));
    for row in rows {
        for (column, value) in columns.iter_mut().zip(row) {
            column.push(value);
        }
    }
    columns
}

/// Each column as one array argument.
fn as_lists<'a, const N: usize>(columns: &'a [Vec<Value<'a>>; N]) -> [Value<'a>; N] {
    std::array::from_fn(|i| Value::List(&columns[i]))
}

/// `superseded`: the encoded column.
fn write_node(conn: &mut Conn, n: &Node, superseded: &str) -> Result<(), StoreError> {
    conn.execute(NODE_UPSERT, &node_args(n, superseded))
        .map(|_| ())
        .map_err(ctx("write node"))
}

/// The arguments of [`NODE_UPSERT`], in its column order.
fn node_args<'a>(n: &'a Node, superseded: &'a str) -> [Value<'a>; 16] {
    [
        Value::from(&*n.node_id),
        n.up.into(),
        n.libvirt_up.into(),
        (n.first_seen as i64).into(),
        (n.last_seen as i64).into(),
        Value::from(&*n.boot),
        (n.boot_ts as i64).into(),
        (n.last_seq as i64).into(),
        Value::from(&*n.version),
        Value::from(&*n.hostname),
        Value::from(&*n.libvirt_version),
        (n.domains as i64).into(),
        (n.gaps as i64).into(),
        (n.lost as i64).into(),
        (n.libvirt_down_since as i64).into(),
        superseded.into(),
    ]
}

/// `usage`: the encoded column.
fn write_vm(conn: &mut Conn, vm: &Vm, usage: &str) -> Result<(), StoreError> {
    conn.execute(VM_UPSERT, &vm_args(vm, usage))
        .map(|_| ())
        .map_err(ctx("write vm"))
}

/// The arguments of [`VM_UPSERT`], in its column order.
fn vm_args<'a>(vm: &'a Vm, usage: &'a str) -> [Value<'a>; 14] {
    [
        Value::from(&*vm.node_id),
        Value::from(&*vm.uuid),
        vm.name.as_str().into(),
        vm.state.as_str().into(),
        vm.reason.as_str().into(),
        (vm.state_since as i64).into(),
        (vm.updated_at as i64).into(),
        vm.usage.net.idle.into(),
        vm.usage.disk.idle.into(),
        vm.duplicate.into(),
        usage.into(),
        vm.last_state().into(),
        vm.unknown_since().map(|t| t as i64).into(),
        vm.unknown_reason().into(),
    ]
}

/// Appends a journal entry; returns its id.
fn write_journal(conn: &mut Conn, e: &Entry) -> Result<i64, StoreError> {
    conn.insert(JOURNAL_INSERT, JOURNAL_INSERT_RETURNING, &journal_args(e))
        .map_err(ctx("write journal"))
}

/// The arguments of [`JOURNAL_INSERT`], in its column order.
fn journal_args(e: &Entry) -> [Value<'_>; 9] {
    [
        (e.received_at as i64).into(),
        (e.event_ts as i64).into(),
        (&e.node_id).into(),
        (&e.uuid).into(),
        (&e.name).into(),
        e.kind.as_str().into(),
        (&e.event).into(),
        (&e.detail).into(),
        (&e.state).into(),
    ]
}

fn node_from_row(mut row: Row) -> Result<Node, DbError> {
    Ok(Node {
        node_id: row.text(0)?.into(),
        up: row.bool(1)?,
        libvirt_up: row.bool(2)?,
        first_seen: row.u64(3)?,
        last_seen: row.u64(4)?,
        boot: row.text(5)?.into(),
        boot_ts: row.u64(6)?,
        last_seq: row.u64(7)?,
        version: row.text(8)?.into(),
        hostname: row.text(9)?.into(),
        libvirt_version: row.text(10)?.into(),
        domains: row.u64(11)?,
        gaps: row.u64(12)?,
        lost: row.u64(13)?,
        libvirt_down_since: row.u64(14)?,
        // Unreadable: forgetting old boots only weakens replay protection for max_message_age.
        superseded: serde_json::from_str(&row.text(15)?).unwrap_or_default(),
    })
}

fn vm_from_row(mut row: Row) -> Result<Vm, DbError> {
    Ok(Vm {
        node_id: row.text(0)?.into(),
        uuid: row.text(1)?.into(),
        name: row.text(2)?.into(),
        state: row.text(3)?.into(),
        reason: row.text(4)?.into(),
        state_since: row.u64(5)?,
        updated_at: row.u64(6)?,
        // A usage column we cannot read costs only the idle history, never the row.
        usage: usage_column::decode(&row.text(7)?),
        duplicate: row.bool(8)?,
        unknown: Unknown::boxed(
            row.opt_text(9)?.map(Into::into),
            row.opt_u64(10)?,
            row.opt_text(11)?,
        ),
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

/// A journal row from [`JOURNAL_COLUMNS`] starting at column `at`.
fn journal_from_row(row: &mut Row, at: usize) -> Result<JournalRow, DbError> {
    Ok(JournalRow {
        id: row.int(at)?,
        received_at: row.u64(at + 1)?,
        event_ts: row.u64(at + 2)?,
        node_id: row.text(at + 3)?,
        uuid: row.text(at + 4)?,
        name: row.text(at + 5)?,
        kind: row.text(at + 6)?,
        event: row.text(at + 7)?,
        detail: row.text(at + 8)?,
        state: row.text(at + 9)?,
    })
}

fn journal_rows(rows: Vec<Row>) -> Result<Vec<JournalRow>, DbError> {
    rows.into_iter()
        .map(|mut r| journal_from_row(&mut r, 0))
        .collect()
}

/// The outbox on a connection of its own: the webhook deliverer deletes acknowledged entries
/// and moves refused ones to the dead letters; `POST /dead-letters/{id}/retry` moves one back.
/// Nodes, VMs and the journal are only ever written by the core.
pub struct Outbox {
    conn: Conn,
    fence: Option<i64>,
}

impl Outbox {
    pub fn open(db: impl Into<Database>) -> Result<Outbox, StoreError> {
        Ok(Outbox {
            conn: Conn::open(&db.into(), Purpose::Outbox)?,
            fence: None,
        })
    }

    /// Makes acknowledgements and dead letters check the leader lease's `epoch`.
    pub fn fence(&mut self, epoch: i64) {
        self.fence = Some(epoch);
    }

    /// The oldest undelivered entries, in journal order.
    pub fn pending(&mut self, limit: u32) -> Result<Vec<JournalRow>, StoreError> {
        self.conn
            .query(
                &format!(
                    "SELECT {JOURNAL_COLUMNS} FROM outbox JOIN journal ON journal.id = outbox.journal_id \
                     ORDER BY outbox.journal_id LIMIT ?1"
                ),
                args![limit],
            )
            .and_then(journal_rows)
            .map_err(ctx("read outbox"))
    }

    /// Removes delivered entries from the outbox (one transaction).
    pub fn ack(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        let fence = self.fence;
        self.conn.transaction("ack outbox", |conn| {
            check_fence(conn, fence)?;
            for id in ids {
                conn.execute("DELETE FROM outbox WHERE journal_id = ?1", args![*id])
                    .map_err(ctx("ack outbox"))?;
            }
            Ok(())
        })
    }

    /// Moves an entry the panel refuses for good from the outbox to the dead letters.
    pub fn dead_letter(
        &mut self,
        id: i64,
        status: u16,
        attempts: u32,
        now: u64,
    ) -> Result<(), StoreError> {
        let fence = self.fence;
        self.conn.transaction("write dead letter", |conn| {
            check_fence(conn, fence)?;
            conn.execute(
                "INSERT INTO dead_letters (journal_id, status, attempts, dead_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (journal_id) DO UPDATE SET status = excluded.status, \
                 attempts = excluded.attempts, dead_at = excluded.dead_at",
                args![id, status, attempts, now as i64],
            )
            .map_err(ctx("write dead letter"))?;
            conn.execute("DELETE FROM outbox WHERE journal_id = ?1", args![id])
                .map_err(ctx("write dead letter"))?;
            Ok(())
        })
    }

    /// Puts a dead letter back at its place in the outbox (journal order). `false` if there is
    /// no dead letter with this id.
    pub fn retry_dead_letter(&mut self, id: i64) -> Result<bool, StoreError> {
        self.conn.transaction("retry dead letter", |conn| {
            let n = conn
                .execute("DELETE FROM dead_letters WHERE journal_id = ?1", args![id])
                .map_err(ctx("retry dead letter"))?;
            if n == 1 {
                conn.execute(
                    "INSERT INTO outbox (journal_id) VALUES (?1) ON CONFLICT (journal_id) DO NOTHING",
                    args![id],
                )
                .map_err(ctx("retry dead letter"))?;
            }
            Ok(n == 1)
        })
    }

    /// Dead letters stored.
    pub fn dead_letter_count(&mut self) -> Result<u64, StoreError> {
        self.conn
            .query_int("SELECT count(*) FROM dead_letters", &[])
            .map(|n| n.max(0) as u64)
            .map_err(ctx("count dead letters"))
    }

    /// Entries waiting.
    pub fn depth(&mut self) -> Result<u64, StoreError> {
        self.conn
            .query_int("SELECT count(*) FROM outbox", &[])
            .map(|n| n.max(0) as u64)
            .map_err(ctx("count outbox"))
    }
}

/// The event bus's side of the journal, on a connection of its own: the entries after its
/// cursor, and the cursor, moved once the broker confirmed them.
pub struct BusCursor {
    conn: Conn,
    fence: Option<i64>,
}

impl BusCursor {
    pub fn open(db: impl Into<Database>) -> Result<BusCursor, StoreError> {
        Ok(BusCursor {
            conn: Conn::open(&db.into(), Purpose::Bus)?,
            fence: None,
        })
    }

    /// Makes moving the cursor check the leader lease's `epoch`.
    pub fn fence(&mut self, epoch: i64) {
        self.fence = Some(epoch);
    }

    /// The last journal id the broker confirmed (0 before any).
    pub fn position(&mut self) -> Result<i64, StoreError> {
        self.conn
            .query_int(
                "SELECT coalesce((SELECT journal_id FROM bus_cursor), 0)",
                &[],
            )
            .map_err(ctx("read the bus cursor"))
    }

    /// The newest journal id (0 if the journal is empty): with the position, the lag.
    pub fn journal_end(&mut self) -> Result<i64, StoreError> {
        self.conn
            .query_int("SELECT coalesce(max(id), 0) FROM journal", &[])
            .map_err(ctx("read the journal end"))
    }

    /// Up to `limit` entries after `id`, in journal order.
    pub fn after(&mut self, id: i64, limit: u32) -> Result<Vec<JournalRow>, StoreError> {
        self.conn
            .query(
                &format!(
                    "SELECT {JOURNAL_COLUMNS} FROM journal WHERE id > ?1 ORDER BY id LIMIT ?2"
                ),
                args![id, limit],
            )
            .and_then(journal_rows)
            .map_err(ctx("read the journal for the bus"))
    }

    /// Moves the cursor to `id`, durably: everything up to it is confirmed. Never backwards.
    pub fn advance(&mut self, id: i64) -> Result<(), StoreError> {
        let fence = self.fence;
        self.conn.transaction("move the bus cursor", |conn| {
            check_fence(conn, fence)?;
            conn.execute(
                "INSERT INTO bus_cursor (id, journal_id) VALUES (1, ?1) \
                 ON CONFLICT (id) DO UPDATE SET journal_id = CASE \
                 WHEN excluded.journal_id > bus_cursor.journal_id THEN excluded.journal_id \
                 ELSE bus_cursor.journal_id END",
                args![id],
            )
            .map(|_| ())
            .map_err(ctx("move the bus cursor"))
        })
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
    conn: Conn,
}

impl Registry {
    /// Opens an existing database (the writer created and migrated it).
    pub fn open(db: impl Into<Database>) -> Result<Registry, StoreError> {
        Ok(Registry {
            conn: Conn::open(&db.into(), Purpose::Registry)?,
        })
    }

    /// Bumped by every enrollment and revocation.
    pub fn version(&mut self) -> Result<i64, StoreError> {
        self.conn
            .query_int(
                "SELECT value FROM settings WHERE key = 'registry_version'",
                &[],
            )
            .map_err(ctx("read the registry version"))
    }

    /// Whether the database predates per-node keys (the fleet key stays accepted by default).
    pub fn fleet_transport(&mut self) -> Result<bool, StoreError> {
        self.conn
            .query_int(
                "SELECT value FROM settings WHERE key = 'fleet_transport'",
                &[],
            )
            .map(|v| v != 0)
            .map_err(ctx("read the fleet key's standing"))
    }

    pub fn all(&mut self) -> Result<Vec<Enrollment>, StoreError> {
        let rows = self
            .conn
            .query(
                "SELECT node_id, public_key, enrolled_at, revoked_at, journaled FROM enrollment",
                &[],
            )
            .map_err(ctx("load enrollments"))?;
        rows.into_iter()
            .map(|mut r| {
                Ok(Enrollment {
                    node_id: r.text(0)?,
                    public_key: r.text(1)?,
                    enrolled_at: r.u64(2)?,
                    revoked_at: r.opt_u64(3)?,
                    journaled: r.text(4)?,
                })
            })
            .collect::<Result<_, DbError>>()
            .map_err(ctx("load enrollments"))
    }

    /// Enrolls `node_id` with its public key (idempotent).
    pub fn enroll(
        &mut self,
        node_id: &str,
        public_key: &str,
        now: u64,
    ) -> Result<Enrolled, StoreError> {
        self.conn.transaction("enrollment", |conn| {
            let found = conn
                .query_row(
                    "SELECT revoked_at FROM enrollment WHERE node_id = ?1",
                    args![node_id],
                )
                .map_err(ctx("read enrollment"))?
                .map(|mut r| r.opt_int(0))
                .transpose()
                .map_err(ctx("read enrollment"))?;
            Ok(match found {
                Some(Some(_)) => Enrolled::Revoked,
                Some(None) => {
                    conn.execute(
                        "UPDATE enrollment SET public_key = ?2 WHERE node_id = ?1 AND public_key = ''",
                        args![node_id, public_key],
                    )
                    .map_err(ctx("write enrollment"))?;
                    Enrolled::Already
                }
                None => {
                    conn.execute(
                        "INSERT INTO enrollment (node_id, public_key, enrolled_at) VALUES (?1, ?2, ?3)",
                        args![node_id, public_key, now as i64],
                    )
                    .map_err(ctx("write enrollment"))?;
                    bump(conn)?;
                    Enrolled::New
                }
            })
        })
    }

    /// Revokes `node_id` (idempotent).
    pub fn revoke(&mut self, node_id: &str, now: u64) -> Result<Revoked, StoreError> {
        self.conn.transaction("revocation", |conn| {
            let changed = conn
                .execute(
                    "UPDATE enrollment SET revoked_at = ?2 WHERE node_id = ?1 AND revoked_at IS NULL",
                    args![node_id, now as i64],
                )
                .map_err(ctx("write revocation"))?;
            if changed > 0 {
                bump(conn)?;
                return Ok(Revoked::Now);
            }
            let known = conn
                .query_int(
                    "SELECT count(*) FROM enrollment WHERE node_id = ?1",
                    args![node_id],
                )
                .map_err(ctx("read enrollment"))?;
            Ok(if known > 0 {
                Revoked::Already
            } else {
                Revoked::NotEnrolled
            })
        })
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
        self.conn.transaction("fill public keys", |conn| {
            for node_id in &missing {
                if let Some(key) = key_of(node_id) {
                    conn.execute(
                        "UPDATE enrollment SET public_key = ?2 WHERE node_id = ?1",
                        args![node_id, &key],
                    )
                    .map_err(ctx("fill public key"))?;
                }
            }
            Ok(missing.len())
        })
    }
}

fn bump(conn: &mut Conn) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE settings SET value = value + 1 WHERE key = 'registry_version'",
        &[],
    )
    .map(|_| ())
    .map_err(ctx("bump the registry version"))
}

/// A read-only connection for the API.
pub struct Reader {
    conn: Conn,
}

impl Reader {
    pub fn open(db: impl Into<Database>) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: Conn::open(&db.into(), Purpose::Reader)?,
        })
    }

    /// The newest journal id (0 if the journal is empty).
    pub fn journal_end(&mut self) -> Result<i64, StoreError> {
        self.conn
            .query_int("SELECT coalesce(max(id), 0) FROM journal", &[])
            .map_err(ctx("read the journal end"))
    }

    /// A page of VM rows and the total count matching the filter.
    pub fn vms(&mut self, f: &VmFilter) -> Result<(Vec<Vm>, u64), StoreError> {
        // The optional filters are fixed SQL fragments: no user text is ever spliced in.
        let mut where_sql =
            String::from("WHERE (CAST(?1 AS TEXT) IS NULL OR node_id = ?1) AND (CAST(?2 AS TEXT) IS NULL OR state = ?2)");
        if f.idle {
            where_sql.push_str(" AND (idle_net <> 0 OR idle_disk <> 0)");
        }
        if f.duplicate {
            where_sql.push_str(" AND duplicate <> 0");
        }
        let total = self
            .conn
            .query_int(
                &format!("SELECT count(*) FROM vms {where_sql}"),
                args![f.node.as_deref(), f.state.as_deref()],
            )
            .map_err(ctx("count vms"))?;
        let rows = self
            .conn
            .query(
                &format!(
                    "SELECT {VM_COLUMNS} FROM vms {where_sql} ORDER BY name, node_id, uuid LIMIT ?3 OFFSET ?4"
                ),
                args![
                    f.node.as_deref(),
                    f.state.as_deref(),
                    f.limit,
                    f.offset as i64
                ],
            )
            .and_then(|rows| rows.into_iter().map(vm_from_row).collect())
            .map_err(ctx("list vms"))?;
        Ok((rows, total.max(0) as u64))
    }

    /// The activity of `uuid` (on `node`, or every node) from `from_day` to `to_day`
    /// inclusive: each row's node and points, in day order.
    pub fn activity(
        &mut self,
        uuid: &str,
        node: Option<&str>,
        from_day: u64,
        to_day: u64,
    ) -> Result<Vec<(String, Vec<crate::activity::Point>)>, StoreError> {
        let rows = self
            .conn
            .query(
                "SELECT node_id, day, points FROM activity WHERE uuid = ?1 \
                 AND (CAST(?2 AS TEXT) IS NULL OR node_id = ?2) AND day BETWEEN ?3 AND ?4 ORDER BY day, node_id",
                args![uuid, node, from_day as i64, to_day as i64],
            )
            .map_err(ctx("read activity"))?;
        rows.into_iter()
            .map(|mut r| {
                let day = r.u64(1)?;
                Ok((r.text(0)?, crate::activity::decode(&r.bytes(2)?, day)))
            })
            .collect::<Result<_, DbError>>()
            .map_err(ctx("read activity"))
    }

    /// Every row of one uuid (one per node).
    pub fn vm(&mut self, uuid: &str) -> Result<Vec<Vm>, StoreError> {
        self.conn
            .query(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE uuid = ?1 ORDER BY node_id"),
                args![uuid],
            )
            .and_then(|rows| rows.into_iter().map(vm_from_row).collect())
            .map_err(ctx("read vm"))
    }

    pub fn nodes(&mut self) -> Result<Vec<Node>, StoreError> {
        self.conn
            .query(
                &format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY node_id"),
                &[],
            )
            .and_then(|rows| rows.into_iter().map(node_from_row).collect())
            .map_err(ctx("list nodes"))
    }

    /// The dead letters, oldest journal entry first, each with its entry.
    pub fn dead_letters(&mut self, limit: u32) -> Result<Vec<DeadLetter>, StoreError> {
        self.conn
            .query(
                &format!(
                    "SELECT dead_letters.status, dead_letters.attempts, dead_letters.dead_at, {JOURNAL_COLUMNS} \
                     FROM dead_letters JOIN journal ON journal.id = dead_letters.journal_id \
                     ORDER BY dead_letters.journal_id LIMIT ?1"
                ),
                args![limit],
            )
            .and_then(|rows| {
                rows.into_iter()
                    .map(|mut r| {
                        Ok(DeadLetter {
                            status: r.int(0)?.clamp(0, 999) as u16,
                            attempts: r.u64(1)?,
                            dead_at: r.u64(2)?,
                            entry: journal_from_row(&mut r, 3)?,
                        })
                    })
                    .collect()
            })
            .map_err(ctx("list dead letters"))
    }

    pub fn events(&mut self, f: &EventFilter) -> Result<Vec<JournalRow>, StoreError> {
        self.conn
            .query(
                &format!(
                    "SELECT {JOURNAL_COLUMNS} FROM journal WHERE id > ?1 AND (CAST(?2 AS TEXT) IS NULL OR node_id = ?2) \
                     AND (CAST(?3 AS TEXT) IS NULL OR uuid = ?3) AND (CAST(?4 AS TEXT) IS NULL OR type = ?4) ORDER BY id LIMIT ?5"
                ),
                args![
                    f.after,
                    f.node.as_deref(),
                    f.uuid.as_deref(),
                    f.kind.as_deref(),
                    f.limit
                ],
            )
            .and_then(journal_rows)
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
