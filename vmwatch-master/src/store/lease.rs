//! The leader lease of a high-availability group (SPEC §13): one row in PostgreSQL, taken when
//! expired and renewed by its holder, timed by the database's clock. Its epoch is the fencing
//! token every write transaction of the leader checks (`check_fence`).

use std::time::Duration;

use super::{args, ctx, Conn, Database, DbError, Purpose, StoreError};

/// The database's clock in ms (one clock for every master, whatever theirs say).
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Whether this master holds the lease now.
    pub leader: bool,
    /// The lease's epoch (this master's when it is the leader).
    pub epoch: i64,
    /// Who holds it, if anyone does (an expired lease has no holder).
    pub holder: Option<String>,
}

/// This master's handle on the lease, on a connection of its own.
pub struct Lease {
    conn: Conn,
    holder: String,
    lease_ms: i64,
}

impl Lease {
    /// Opens the lease of `db` (PostgreSQL only) for the master named `holder`.
    pub fn open(db: &Database, holder: &str, lease: Duration) -> Result<Lease, StoreError> {
        if db.sqlite_path().is_some() {
            return Err(StoreError::Database {
                step: "open the leader lease",
                error: DbError::Config("high availability needs a PostgreSQL database".into()),
            });
        }
        Ok(Lease {
            conn: Conn::open(db, Purpose::Lease)?,
            holder: holder.to_owned(),
            lease_ms: lease.as_millis() as i64,
        })
    }

    /// Takes the lease if it is free or expired, or renews it if this master holds it at
    /// `mine`; a master that held it under the same name before (a restart) gets a new epoch.
    pub fn claim(&mut self, mine: Option<i64>) -> Result<Claim, StoreError> {
        let sql = format!(
            "INSERT INTO leader_lease (id, epoch, holder, expires_at) VALUES (1, 1, ?1, {NOW_MS} + ?2) \
             ON CONFLICT (id) DO UPDATE SET \
               epoch = CASE WHEN leader_lease.holder = excluded.holder AND leader_lease.epoch = ?3 \
                       THEN leader_lease.epoch ELSE leader_lease.epoch + 1 END, \
               holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE (leader_lease.holder = excluded.holder AND leader_lease.epoch = ?3) \
                OR leader_lease.expires_at <= {NOW_MS} \
             RETURNING epoch"
        );
        let taken = self
            .conn
            .query_row(&sql, args![self.holder.as_str(), self.lease_ms, mine])
            .map_err(ctx("claim the leader lease"))?;
        if let Some(mut row) = taken {
            let epoch = row.int(0).map_err(ctx("claim the leader lease"))?;
            return Ok(Claim {
                leader: true,
                epoch,
                holder: Some(self.holder.clone()),
            });
        }
        let mut row = self
            .conn
            .query_row(
                &format!(
                    "SELECT epoch, holder, CASE WHEN expires_at > {NOW_MS} THEN 1 ELSE 0 END \
                     FROM leader_lease WHERE id = 1"
                ),
                &[],
            )
            .map_err(ctx("read the leader lease"))?
            .ok_or(StoreError::Database {
                step: "read the leader lease",
                error: DbError::Config("no lease row".into()),
            })?;
        let read = ctx("read the leader lease");
        let epoch = row.int(0).map_err(&read)?;
        let holder = row.text(1).map_err(&read)?;
        let live = row.bool(2).map_err(&read)?;
        Ok(Claim {
            leader: false,
            epoch,
            holder: live.then_some(holder),
        })
    }

    /// Gives the lease up at once (a clean stop), so a standby takes over without waiting for
    /// it to expire.
    pub fn release(&mut self, epoch: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE leader_lease SET expires_at = 0 WHERE id = 1 AND epoch = ?1 AND holder = ?2",
                args![epoch, self.holder.as_str()],
            )
            .map(|_| ())
            .map_err(ctx("release the leader lease"))
    }
}
