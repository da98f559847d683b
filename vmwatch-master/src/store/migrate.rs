//! `vmwatch-master migrate --to postgres://…`: copies a whole database (every table, journal
//! ids kept) into an empty one in one transaction, then checks that every table holds as many
//! rows on both sides.

use super::{ctx, Conn, Database, Dialect, Purpose, StoreError, Value};

/// Each table and its columns, in an order that satisfies nothing but readability (the schema
/// has no foreign keys).
const TABLES: &[(&str, &str, &str)] = &[
    (
        "nodes",
        "node_id, up, libvirt_up, first_seen, last_seen, boot, boot_ts, last_seq, version, \
      hostname, libvirt_version, domains, gaps, lost, libvirt_down_since, superseded",
        "node_id",
    ),
    (
        "vms",
        "node_id, uuid, name, state, reason, state_since, updated_at, idle_net, idle_disk, \
      duplicate, usage, last_state, unknown_since, unknown_reason",
        "node_id, uuid",
    ),
    (
        "journal",
        "id, received_at, event_ts, node_id, uuid, name, type, event, detail, state",
        "id",
    ),
    ("outbox", "journal_id", "journal_id"),
    (
        "dead_letters",
        "journal_id, status, attempts, dead_at",
        "journal_id",
    ),
    ("bus_cursor", "id, journal_id", "id"),
    (
        "activity",
        "uuid, node_id, day, points",
        "uuid, node_id, day",
    ),
    (
        "enrollment",
        "node_id, public_key, enrolled_at, revoked_at, journaled",
        "node_id",
    ),
];

/// Rows read and written per round.
const PAGE: i64 = 5_000;

/// One table's rows on each side after the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub table: &'static str,
    pub source: i64,
    pub target: i64,
}

/// Copies `from` into `to` (created and migrated if needed, and required to be empty).
/// Returns each table's counts; an error if any differ (the target's transaction is then
/// rolled back, so a failed migration leaves it empty).
pub fn migrate(from: &Database, to: &Database) -> Result<Vec<Copied>, StoreError> {
    let mut source = Conn::open(from, Purpose::Writer)?;
    let mut target = Conn::open(to, Purpose::Writer)?;
    for (table, _, _) in TABLES {
        let n = target
            .query_int(&format!("SELECT count(*) FROM {table}"), &[])
            .map_err(ctx("count the target's rows"))?;
        if n > 0 {
            return Err(StoreError::Database {
                step: "check the target is empty",
                error: super::DbError::Config(format!(
                    "{to} already holds {n} rows in table {table}; migrate needs an empty database"
                )),
            });
        }
    }
    // One snapshot of the source (a running master's writes wait, or land after it).
    source
        .batch(match source.dialect() {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        })
        .map_err(ctx("begin reading the source"))?;
    let copied = target.transaction("copy", |target| copy(&mut source, target));
    let _ = source.batch("ROLLBACK");
    copied
}

/// Rows per insert: one statement of many rows (`VALUES (…), (…)`) instead of a round trip to
/// PostgreSQL per row. A page of [`PAGE`] rows is whole inserts of this many and one shorter,
/// so each table prepares at most three statements.
const ROWS_PER_INSERT: usize = 500;

/// `INSERT INTO table (columns) VALUES (?1, …), …` for `rows` rows of `width` columns.
fn insert_rows(table: &str, columns: &str, width: usize, rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|r| {
            let marks: Vec<String> = (1..=width).map(|c| format!("?{}", r * width + c)).collect();
            format!("({})", marks.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {table} ({columns}) VALUES {}",
        values.join(", ")
    )
}

fn copy(source: &mut Conn, target: &mut Conn) -> Result<Vec<Copied>, StoreError> {
    for (table, columns, key) in TABLES {
        let width = columns.split(',').count();
        let whole = insert_rows(table, columns, width, ROWS_PER_INSERT);
        let select = format!("SELECT {columns} FROM {table} ORDER BY {key} LIMIT ?1 OFFSET ?2");
        let mut offset = 0;
        loop {
            let rows = source
                .query(&select, &[Value::Int(PAGE), Value::Int(offset)])
                .map_err(ctx("read the source"))?;
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let args: Vec<Value<'_>> = chunk
                    .iter()
                    .flat_map(|row| row.0.iter().map(|c| c.as_value()))
                    .collect();
                let insert = if chunk.len() == ROWS_PER_INSERT {
                    std::borrow::Cow::Borrowed(&whole)
                } else {
                    std::borrow::Cow::Owned(insert_rows(table, columns, width, chunk.len()))
                };
                target
                    .execute(&insert, &args)
                    .map_err(ctx("write the target"))?;
            }
            if (rows.len() as i64) < PAGE {
                break;
            }
            offset += PAGE;
        }
    }
    // The registry's version and the fleet key's standing (the target's schema wrote defaults).
    let settings = source
        .query(
            "SELECT key, value FROM settings WHERE key IN ('registry_version', 'fleet_transport')",
            &[],
        )
        .map_err(ctx("read the source's settings"))?;
    for row in &settings {
        let args: Vec<Value<'_>> = row.0.iter().map(|c| c.as_value()).collect();
        target
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &args,
            )
            .map_err(ctx("write the target's settings"))?;
    }
    // New journal ids continue after every id the source ever gave (SQLite's AUTOINCREMENT
    // remembers ids retention deleted): the bus cursor and the panel rely on them growing.
    let mut next = source
        .query_int("SELECT coalesce(max(id), 0) FROM journal", &[])
        .map_err(ctx("read the journal's end"))?;
    if source.dialect() == Dialect::Sqlite {
        if let Some(mut row) = source
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'journal'",
                &[],
            )
            .map_err(ctx("read the journal's sequence"))?
        {
            next = next.max(row.int(0).map_err(ctx("read the journal's sequence"))?);
        }
    }
    if target.dialect() == Dialect::Postgres {
        target
            .query(
                "SELECT setval(pg_get_serial_sequence('journal', 'id'), ?1 + 1, false)",
                &[Value::Int(next)],
            )
            .map_err(ctx("move the journal's sequence"))?;
    }
    let mut counts = Vec::new();
    for (table, _, _) in TABLES {
        let count = |c: &mut Conn| {
            c.query_int(&format!("SELECT count(*) FROM {table}"), &[])
                .map_err(ctx("count rows"))
        };
        let copied = Copied {
            table,
            source: count(source)?,
            target: count(target)?,
        };
        if copied.source != copied.target {
            return Err(StoreError::Database {
                step: "verify the copy",
                error: super::DbError::Config(format!(
                    "table {table}: {} rows in the source, {} in the target",
                    copied.source, copied.target
                )),
            });
        }
        counts.push(copied);
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_insert_numbers_every_rows_placeholders_in_turn() {
        assert_eq!(
            super::insert_rows("outbox", "journal_id, x", 2, 3),
            "INSERT INTO outbox (journal_id, x) VALUES (?1, ?2), (?3, ?4), (?5, ?6)"
        );
    }
}
