//! High availability (SPEC §13): any number of masters on one PostgreSQL database, one leader.
//!
//! A master with `ha=yes` starts as a **standby** ([`standby`]): no node port; the HTTP API
//! served from the database (a follower thread turns new journal entries into the change feed
//! `/wait` listens to), and a claim on the leader lease every [`STANDBY_CLAIM`]. Once it holds the
//! lease it stops the standby's HTTP server and starts as the leader (`run::start`), every write
//! transaction fenced by the lease's epoch. [`Keeper`] renews the lease every third of
//! `ha_lease`; when the lease is lost (taken over, or not renewed within `ha_lease` by this
//! master's own clock) the master **steps down**: it stops like a SIGTERM, without writing
//! (the fence refuses), and `run` executes itself again, to start over as a standby.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmwatch_common::daemon::Shutdown;

use crate::config::{Ha, MasterConfig};
use crate::metrics::Metrics;
use crate::store::{EventFilter, Lease, Reader, StoreError};

/// How often a standby tries to take the lease (a held lease is only taken once expired).
pub const STANDBY_CLAIM: Duration = Duration::from_millis(500);
/// How often a standby's follower reads new journal entries for `/wait`.
const FOLLOW: Duration = Duration::from_millis(100);

/// What `/healthz` and `/metrics` say of this master's role.
pub struct HaState {
    pub name: String,
    pub leader: AtomicBool,
    pub epoch: AtomicI64,
    /// The leader's name, as last read (none while the lease is expired).
    pub holder: Mutex<Option<String>>,
}

impl HaState {
    pub fn new(name: &str) -> HaState {
        HaState {
            name: name.to_owned(),
            leader: AtomicBool::new(false),
            epoch: AtomicI64::new(0),
            holder: Mutex::new(None),
        }
    }

    pub fn holder(&self) -> Option<String> {
        self.holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn saw(&self, claim: &crate::store::Claim, metrics: &Metrics) {
        self.epoch.store(claim.epoch, Ordering::Relaxed);
        metrics.ha_epoch.set(claim.epoch);
        *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = claim.holder.clone();
    }
}

/// Claims the lease until this master holds it, serving the standby's API meanwhile through
/// `serve_standby`. Returns the epoch, or `None` if the master was told to stop first.
pub fn wait_for_lease(
    config: &MasterConfig,
    ha: &Ha,
    state: &HaState,
    metrics: &Metrics,
    shutdown: &Shutdown,
) -> Result<Option<(i64, Lease)>, StoreError> {
    let mut lease = Lease::open(&config.database, &ha.name, ha.lease)?;
    let mut failing = false;
    loop {
        match lease.claim(None) {
            Ok(claim) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("the leader lease can be read again");
                }
                let changed = state.holder() != claim.holder;
                state.saw(&claim, metrics);
                if claim.leader {
                    return Ok(Some((claim.epoch, lease)));
                }
                if changed {
                    tracing::info!(
                        leader = claim
                            .holder
                            .as_deref()
                            .unwrap_or("(none: the lease expired)"),
                        epoch = claim.epoch,
                        "standby: another master leads"
                    );
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "standby: cannot claim the leader lease; retrying every 0.5 s");
                }
            }
        }
        if shutdown.wait_timeout(STANDBY_CLAIM) {
            return Ok(None);
        }
    }
}

/// The standby's follower: new journal entries become the change feed `/wait` listens to, and
/// the pulse beats while the database answers.
pub fn follow(reader: &mut Reader, shared: &crate::core::Shared, stop: &AtomicBool) {
    let mut last = None;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        let read = match last {
            None => reader.journal_end().map(|end| {
                last = Some(end);
                Vec::new()
            }),
            Some(after) => reader.events(&EventFilter {
                after,
                limit: 1000,
                ..Default::default()
            }),
        };
        match read {
            Ok(rows) => {
                if std::mem::take(&mut failing) {
                    tracing::info!("standby: the database answers again");
                }
                shared.db_ok.store(true, Ordering::Relaxed);
                shared.pulse.beat(vmwatch_common::time::now_ms());
                if let Some(end) = rows.last().map(|r| r.id) {
                    last = Some(end);
                    let changes: Vec<crate::rules::VmChange> = rows
                        .iter()
                        .filter(|r| !r.uuid.is_empty())
                        .map(|r| crate::rules::VmChange {
                            uuid: r.uuid.clone(),
                            state: Some(r.state.clone()).filter(|s| !s.is_empty()),
                        })
                        .collect();
                    let _ = shared.vm_changes.send(Arc::new(changes));
                    shared.committed.send_modify(|n| *n = end.max(0) as u64);
                }
            }
            Err(e) => {
                shared.db_ok.store(false, Ordering::Relaxed);
                shared.pulse.beat(vmwatch_common::time::now_ms());
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "standby: cannot read the journal; retrying");
                }
            }
        }
        std::thread::sleep(FOLLOW);
    }
}

/// The leader's renewals, on a thread of its own.
pub struct Keeper {
    pub lease: Lease,
    pub epoch: i64,
    pub every: Duration,
    pub lease_for: Duration,
}

impl Keeper {
    /// Renews until the master stops or the lease is lost; on a loss, sets `stepped_down` and
    /// triggers the one shutdown.
    pub fn run(
        mut self,
        state: Arc<HaState>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        stepped_down: Arc<AtomicBool>,
    ) {
        let mut renewed = Instant::now();
        let mut failing = false;
        loop {
            if shutdown.wait_timeout(self.every) {
                if !stepped_down.load(Ordering::Relaxed) {
                    // A clean stop hands the lease over at once.
                    match self.lease.release(self.epoch) {
                        Ok(()) => tracing::info!(epoch = self.epoch, "leader lease released"),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot release the leader lease; a standby takes over once it expires")
                        }
                    }
                }
                return;
            }
            let lost = match self.lease.claim(Some(self.epoch)) {
                Ok(claim) if claim.leader && claim.epoch == self.epoch => {
                    renewed = Instant::now();
                    if std::mem::take(&mut failing) {
                        tracing::info!(epoch = self.epoch, "leader lease renewed again");
                    }
                    None
                }
                Ok(claim) => {
                    state.saw(&claim, &metrics);
                    Some(format!(
                        "the lease is now {} at epoch {}",
                        claim
                            .holder
                            .as_deref()
                            .map_or_else(|| "free".to_owned(), |h| format!("held by {h}")),
                        claim.epoch
                    ))
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot renew the leader lease");
                    }
                    (renewed.elapsed() >= self.lease_for).then(|| {
                        format!("not renewed for {} s (ha_lease)", self.lease_for.as_secs())
                    })
                }
            };
            if let Some(why) = lost {
                tracing::warn!(epoch = self.epoch, "lost the leader lease ({why}); stepping down: closing the node port, writing nothing more, starting again as a standby");
                state.leader.store(false, Ordering::Relaxed);
                metrics.ha_leader.set(0);
                metrics.ha_transitions.inc();
                stepped_down.store(true, Ordering::Relaxed);
                shutdown.trigger();
                return;
            }
        }
    }
}
