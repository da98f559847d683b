//! The core thread and its writer. The core feeds authenticated messages to the rules in
//! batches; the writer thread, the one writer of the store, commits each decided batch in one
//! transaction, in order, then updates metrics and wakes waiters. The two overlap: the core
//! decides batch k+1 while the writer commits batch k, and hands k+1 over only once k is
//! committed (a rendezvous channel), so at most one batch waits and ingest pushes back behind
//! a database that refuses writes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmwatch_common::daemon::{Pulse, Shutdown};
use vmwatch_common::protocol::{AgentCounters, Rejected};
use vmwatch_common::time::now_ms;

use crate::ingest::Received;
use crate::metrics::{KindLabel, Metrics, NodeLabel, RejectLog, ResourceLabel, StateLabel};
use crate::rules::{self, Effect, Inventory, Rules, VmChange};
use crate::store::{Prepared, Store};

/// Most messages applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Most row writes and journal entries decided from messages into one transaction (a snapshot
/// is a row per VM: 4096 snapshots of 50 VMs would be 200,000), and the budget of each
/// liveness check. A transaction can hold up to about twice this: what one turn's messages
/// left (less than this), the liveness check's rows (this, plus the rest of one node's) and the
/// duplicate check's.
pub const MAX_BATCH_ROWS: usize = 65_536;

/// Shared signals between the core and the HTTP side.
pub struct Shared {
    /// Bumped after every commit (and when a dead letter is retried); the webhook deliverer
    /// waits on it.
    pub committed: tokio::sync::watch::Sender<u64>,
    /// The VM rows each commit changed; long-polls (`/wait`) listen to it.
    pub vm_changes: tokio::sync::broadcast::Sender<Arc<Vec<VmChange>>>,
    /// Beats on every turn of the core loop (the watchdog and `/healthz` check it).
    pub pulse: Pulse,
    /// Whether the last commit succeeded (`/healthz`).
    pub db_ok: AtomicBool,
    /// The daemon's one shutdown token: long-polls answer, servers drain, ingest stops.
    pub shutdown: Shutdown,
    /// The enrolled nodes (ingest, the core and the API follow the same registry).
    pub registry: Arc<crate::registry::Shared>,
}

/// A decided batch: its effects and what to count once it is committed.
pub struct Decided {
    batch: Prepared,
    accepted: Vec<(&'static str, u64)>,
    gaps: Vec<(String, u64)>,
}

pub struct Core {
    /// Until the core thread starts it.
    writer: Option<Writer>,
    /// The batch last handed to the writer (the core frees each batch, not the writer).
    handed_over: Option<Arc<Decided>>,
    /// Row writes waiting to share a commit.
    held: Held,
    inventory: Inventory,
    rules: Rules,
    metrics: Arc<Metrics>,
    reject_log: Arc<RejectLog>,
    /// From when every node is given a full node_timeout (the start, or the end of an outage):
    /// unix ms, moved on by the writer when the database takes writes again.
    started_at: Arc<AtomicU64>,
    shared: Arc<Shared>,
    /// The VM gauges' counts per node.
    tally: Tally,
    /// The agent counters of the heartbeats since the gauges were last updated (a gauge per
    /// node and counter: set once a second, not once a heartbeat).
    agents: HashMap<String, AgentCounters>,
    /// The registry version whose enrollments and revocations are journaled.
    registry_seen: i64,
    /// The enrollment state this core journaled per node since it started.
    journaled: HashMap<String, &'static str>,
}

impl Core {
    pub fn new(
        store: Store,
        inventory: Inventory,
        rules: Rules,
        retention: crate::retention::Retention,
        metrics: Arc<Metrics>,
        reject_log: Arc<RejectLog>,
        shared: Arc<Shared>,
    ) -> Core {
        let started_at = Arc::new(AtomicU64::new(now_ms()));
        Core {
            writer: Some(Writer {
                store,
                metrics: metrics.clone(),
                shared: shared.clone(),
                retention,
                started_at: started_at.clone(),
                abandoned: false,
            }),
            handed_over: None,
            held: Held::default(),
            inventory,
            rules,
            metrics,
            reject_log,
            started_at,
            shared,
            agents: HashMap::new(),
            tally: Tally::default(),
            registry_seen: i64::MIN,
            journaled: HashMap::new(),
        }
    }

    pub fn spawn(self, rx: Receiver<Received>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("core".into())
            .spawn(move || {
                let _guard = self.shared.shutdown.guard("the core thread");
                self.run(rx)
            })
    }

    fn run(mut self, rx: Receiver<Received>) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        // Rendezvous: a batch is handed over only when the writer has committed the one before.
        let (to_writer, jobs) = std::sync::mpsc::sync_channel::<Job>(0);
        let writer = match std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || writer.run(jobs))
        {
            Ok(handle) => handle,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the writer thread");
                self.shared.shutdown.trigger();
                return;
            }
        };
        let mut next_liveness = Instant::now();
        let mut next_gauges = Instant::now();
        // Once at start (a master that was down may be behind), then hourly.
        let mut next_purge = Instant::now();
        loop {
            self.shared.pulse.beat(now_ms());
            let mut batch = Vec::new();
            let mut closed = false;
            let mut wait = Duration::from_millis(250);
            if let Some(due) = self.held_until() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    batch.push(first);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed = true,
            }
            self.follow_registry(&to_writer);
            let liveness_due = Instant::now() >= next_liveness;
            if !batch.is_empty() || liveness_due {
                self.process(batch, liveness_due, &to_writer);
                if liveness_due {
                    next_liveness = Instant::now() + Duration::from_secs(1);
                }
            }
            if closed || self.held_until().is_some_and(|due| Instant::now() >= due) {
                self.hand_over(&to_writer);
            }
            if Instant::now() >= next_purge {
                // What is held was decided before the purge.
                self.hand_over(&to_writer);
                // The writer is gone only if it ended, which triggers the shutdown.
                let _ = to_writer.send(Job::Purge);
                next_purge =
                    Instant::now() + Duration::from_millis(crate::retention::PURGE_EVERY_MS);
            }
            if Instant::now() >= next_gauges {
                self.update_gauges();
                next_gauges = Instant::now() + Duration::from_secs(1);
            }
            if closed {
                // The writer commits (or, stopping behind a refusing database, reports lost)
                // what it holds, then ends.
                drop(to_writer);
                if writer.join().is_err() {
                    tracing::error!("the writer thread panicked");
                }
                self.update_gauges();
                return;
            }
        }
    }

    /// Hands a decided batch to the writer (waiting for the one before it to commit).
    fn submit(&mut self, to_writer: &SyncSender<Job>, decided: Decided) {
        let decided = Arc::new(decided);
        if to_writer.send(Job::Commit(decided.clone())).is_err() {
            tracing::error!("the writer thread is gone; stopping");
            self.shared.shutdown.trigger();
        }
        // The writer took this batch, so it is done with the one before: that one is freed here.
        self.handed_over = Some(decided);
    }

    /// Journals every enrollment and revocation not yet journaled, and removes revoked nodes
    /// from the inventory (SPEC §10), when the registry changed.
    fn follow_registry(&mut self, to_writer: &SyncSender<Job>) {
        let snapshot = self.shared.registry.get();
        if snapshot.version == self.registry_seen {
            return;
        }
        let now = now_ms();
        let mut effects = Vec::new();
        for row in &snapshot.rows {
            let state = row.state();
            // What this core journaled itself wins over the row's `journaled`: ingest may
            // have loaded the row before that commit landed, and the entry would go twice.
            let journaled = self
                .journaled
                .get(&row.node_id)
                .copied()
                .unwrap_or(row.journaled.as_str());
            if journaled == state {
                continue;
            }
            self.journaled.insert(row.node_id.clone(), state);
            if state == "revoked" {
                let removed = rules::revoke_node(&mut self.inventory, &row.node_id, now);
                tracing::warn!(node_id = %row.node_id, vms = removed.len() / 2, "node revoked: its rows leave the inventory");
                effects.extend(removed);
            }
            effects.extend(rules::enrollment_entry(&row.node_id, state, now));
        }
        self.registry_seen = snapshot.version;
        if effects.is_empty() {
            return;
        }
        self.inventory.copies.note(&effects);
        self.tally.note(&effects);
        // After what is held: those rows were decided first.
        self.held.since.get_or_insert_with(Instant::now);
        self.held.effects.extend(effects);
        self.hand_over(to_writer);
    }

    fn process(&mut self, batch: Vec<Received>, liveness: bool, to_writer: &SyncSender<Job>) {
        let now = now_ms();
        let mut effects: Vec<Effect> = Vec::new();
        let mut accepted: Vec<(&'static str, u64)> = Vec::with_capacity(batch.len());
        let mut gaps = Vec::new();
        let registry = self.shared.registry.get();
        for received in batch {
            // Revoked while the message waited: it changes nothing (SPEC §10).
            if registry.is_revoked(received.message.node_id().as_str()) {
                self.metrics
                    .count_reject(vmwatch_common::protocol::Reject::Revoked);
                self.reject_log.log(&Rejected {
                    reason: vmwatch_common::protocol::Reject::Revoked,
                    node_id: Some(received.message.node_id().as_str().to_owned()),
                    detail: "node revoked while its message waited for the core".into(),
                });
                continue;
            }
            // Judged as of its arrival: time the master held it (a full disk) never ages it.
            let at = received.arrived.min(now);
            match rules::handle(&mut self.inventory, &self.rules, at, received.message) {
                Ok(outcome) => {
                    accepted.push((outcome.kind, outcome.ts));
                    if let Some(lost) = outcome.gap {
                        gaps.push((outcome.node_id.clone(), lost));
                    }
                    if let Some(agent) = outcome.agent {
                        self.agents.insert(outcome.node_id, agent);
                    }
                    effects.extend(outcome.effects);
                    // Snapshots carry a row per VM: a batch is bounded in rows too, so a
                    // burst of them (10,000 nodes connecting) is not decided whole in memory.
                    if effects.len() >= MAX_BATCH_ROWS {
                        self.inventory.copies.note(&effects);
                        let (e, a, g) = (
                            std::mem::take(&mut effects),
                            std::mem::take(&mut accepted),
                            std::mem::take(&mut gaps),
                        );
                        self.hold(e, a, g, to_writer);
                    }
                }
                Err(refused) => {
                    self.metrics.count_reject(refused.reason);
                    self.reject_log.log(&Rejected {
                        reason: refused.reason,
                        node_id: Some(refused.node_id),
                        detail: format!("{} message", refused.kind),
                    });
                }
            }
        }
        // The duplicate rule re-evaluates the uuids of the rows written here.
        self.inventory.copies.note(&effects);
        if liveness {
            let started_at = self.started_at.load(Ordering::Relaxed);
            let live = rules::check_liveness(
                &mut self.inventory,
                &self.rules,
                now,
                started_at,
                MAX_BATCH_ROWS,
            );
            self.inventory.copies.note(&live);
            effects.extend(live);
            effects.extend(crate::duplicate::check(
                &mut self.inventory,
                now,
                self.rules.duplicate_grace_ms,
            ));
        }
        self.hold(effects, accepted, gaps, to_writer);
    }

    /// Adds decided effects to what is held, and hands it all over if one is a journal entry
    /// or a batch is full.
    fn hold(
        &mut self,
        effects: Vec<Effect>,
        accepted: Vec<(&'static str, u64)>,
        gaps: Vec<(String, u64)>,
        to_writer: &SyncSender<Job>,
    ) {
        // The gauges recount the nodes whose rows are written.
        self.tally.note(&effects);
        if effects.is_empty() {
            return;
        }
        let journals = effects.iter().any(|e| matches!(e, Effect::Journal(_)));
        // Within the bounds: what is held goes first if these would overfill its batch.
        if self.held.effects.len() + effects.len() > MAX_BATCH_ROWS
            || self.held.accepted.len() + accepted.len() > MAX_BATCH
        {
            self.hand_over(to_writer);
        }
        let held = &mut self.held;
        held.since.get_or_insert_with(Instant::now);
        held.effects.extend(effects);
        held.accepted.extend(accepted);
        held.gaps.extend(gaps);
        if journals || held.accepted.len() >= MAX_BATCH || held.effects.len() >= MAX_BATCH_ROWS {
            self.hand_over(to_writer);
        }
    }

    /// Hands what is held to the writer as one batch, its row writes coalesced.
    fn hand_over(&mut self, to_writer: &SyncSender<Job>) {
        let Held {
            effects,
            accepted,
            gaps,
            ..
        } = std::mem::take(&mut self.held);
        if effects.is_empty() {
            return;
        }
        let decided = Decided {
            batch: Prepared::new(rules::coalesce(effects)),
            accepted,
            gaps,
        };
        self.submit(to_writer, decided);
    }

    /// When what is held is due for the writer.
    fn held_until(&self) -> Option<Instant> {
        self.held.since.map(|since| since + HOLD_ROW_WRITES)
    }
}

/// How long row writes without a journal entry (heartbeats, stats: a node's `last_seen`, a
/// VM's counters) may wait to share a commit with the next ones. A journal entry is handed
/// over at once, with everything held before it. At 10,000 nodes the heartbeats alone are
/// 333 messages a second: one commit each cost the writer twice the CPU of everything else.
const HOLD_ROW_WRITES: Duration = Duration::from_millis(100);

/// Decided effects the core holds back (see [`HOLD_ROW_WRITES`]); the inventory already
/// reflects them.
#[derive(Default)]
struct Held {
    effects: Vec<Effect>,
    accepted: Vec<(&'static str, u64)>,
    gaps: Vec<(String, u64)>,
    /// When the first of them was decided.
    since: Option<Instant>,
}

/// What the core hands the writer.
enum Job {
    /// Shared with the core, which drops it (freeing thousands of rows is off the writer's path).
    Commit(Arc<Decided>),
    /// Retention's hourly purge (in the writer: it writes).
    Purge,
}

/// The writer thread: owns the store, commits decided batches in the order they come.
struct Writer {
    store: Store,
    metrics: Arc<Metrics>,
    shared: Arc<Shared>,
    retention: crate::retention::Retention,
    /// The core's liveness start, moved on at the end of an outage.
    started_at: Arc<AtomicU64>,
    /// Stopping while the database refused a batch: what follows is reported lost too.
    abandoned: bool,
}

impl Writer {
    fn run(mut self, jobs: Receiver<Job>) {
        let _guard = self.shared.shutdown.guard("the writer thread");
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Commit(decided) => self.commit_until_done(&decided),
                Job::Purge => self.purge(),
            }
        }
    }

    /// Commits a batch, retrying every 0.5 s while the database refuses it (disk full, I/O
    /// error, PostgreSQL away): the core waits to hand over the next one meanwhile, so ingest
    /// pushes back and nothing accepted is lost, unless the master stops first.
    fn commit_until_done(&mut self, decided: &Decided) {
        let mut failed = false;
        // Stopping, a refused batch gets one more try before it (and all after it) is lost.
        let mut last_try = false;
        loop {
            if self.abandoned {
                tracing::error!(
                    writes = decided.batch.effects().len(),
                    "stopping with a batch the database refused; it is lost"
                );
                return;
            }
            match self.commit(decided) {
                Ok(()) => break,
                Err(()) => {
                    failed = true;
                    if self.shared.shutdown.is_triggered() {
                        if last_try {
                            self.abandoned = true;
                            continue;
                        }
                        last_try = true;
                    }
                    // Alive, and doing its job: the watchdog and /healthz see the retries.
                    self.shared.pulse.beat(now_ms());
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        if failed {
            // Messages queued meanwhile carry their arrival times: judged by the clock now,
            // every node would look silent for the whole outage. Like after a restart, each
            // node gets a full node_timeout from here.
            self.started_at.store(now_ms(), Ordering::Relaxed);
            tracing::info!("database writes succeed again; the held batch is committed");
        }
    }

    /// Commits one decided batch, then counts, logs and wakes waiters; on failure the batch
    /// stays the caller's, to be retried (the in-memory inventory already reflects it).
    fn commit(&mut self, decided: &Decided) -> Result<(), ()> {
        let Decided {
            batch,
            accepted,
            gaps,
        } = decided;
        let effects = batch.effects();
        let started = Instant::now();
        let ids = match self.store.commit_prepared(batch) {
            Ok(ids) => ids,
            Err(e) => {
                self.metrics.db_errors.inc();
                self.metrics.db_ok.set(0);
                if self.shared.db_ok.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "database write failed; holding the batch and retrying every 0.5 s (ingest pushes back meanwhile)");
                }
                return Err(());
            }
        };
        // A hop of `vmwatch-bench-latency`'s breakdown.
        tracing::debug!(journal_entries = ids.len(), "committed");
        self.shared.db_ok.store(true, Ordering::Relaxed);
        self.metrics.db_ok.set(1);
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.journal_entries.inc_by(ids.len() as u64);
        self.metrics.journal_size.inc_by(ids.len() as i64);
        if self.store.outbox_enabled() {
            self.metrics.outbox_depth.inc_by(ids.len() as i64);
        }
        let committed = now_ms();
        for (kind, ts) in accepted {
            self.metrics
                .accepted
                .get_or_create(&KindLabel { kind })
                .inc();
            self.metrics
                .ingest_latency
                .observe(committed.saturating_sub(*ts) as f64 / 1000.0);
        }
        for (node_id, lost) in gaps {
            self.metrics.gaps.inc();
            self.metrics.lost.inc_by(*lost);
            tracing::warn!(node_id = %node_id, lost, "sequence gap: messages lost; the next snapshot repairs the state");
        }
        for e in effects {
            if let Effect::Journal(j) = e {
                // Node-supplied strings quoted (`name="…"`): a VM name cannot add fields.
                tracing::info!(node_id = %j.node_id, uuid = ?j.uuid, name = ?j.name, r#type = j.kind.as_str(), event = ?j.event, detail = ?j.detail, state = ?j.state, "journal");
            }
        }
        self.shared.committed.send_modify(|n| *n += 1);
        // Built only for listening long-polls (each subscribes before it reads the row, so
        // one that subscribed after this check reads what was just committed).
        let changes = if self.shared.vm_changes.receiver_count() > 0 {
            rules::vm_changes(effects)
        } else {
            Vec::new()
        };
        if !changes.is_empty() {
            // No receiver (no waiter) is fine.
            let _ = self.shared.vm_changes.send(Arc::new(changes));
        }
        Ok(())
    }

    fn purge(&mut self) {
        let now = now_ms();
        if let Some(cutoff) = crate::retention::cutoff(now, self.retention.journal_days) {
            match self.store.purge_journal(cutoff) {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.journal_size.dec_by(n as i64);
                    tracing::info!(
                        purged = n,
                        retention_days = self.retention.journal_days,
                        "old journal entries purged"
                    );
                }
                Err(e) => tracing::error!(error = %e, "journal purge failed; retrying in an hour"),
            }
        }
        if let Some(day) = crate::activity::cutoff_day(now, self.retention.activity_days) {
            match self.store.purge_activity(day) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    purged_vm_days = n,
                    activity_retention_days = self.retention.activity_days,
                    "old activity history purged"
                ),
                Err(e) => tracing::error!(error = %e, "activity purge failed; retrying in an hour"),
            }
        }
    }
}

impl Core {
    fn update_gauges(&mut self) {
        for (node, agent) in self.agents.drain() {
            self.metrics.set_agent(&node, &agent);
        }
        let up = self.inventory.nodes.values().filter(|n| n.up).count() as i64;
        self.metrics.nodes_up.set(up);
        self.metrics
            .nodes_down
            .set(self.inventory.nodes.len() as i64 - up);
        let Updated { node_rows, totals } = self.tally.update(&self.inventory);
        for node_id in node_rows {
            let label = NodeLabel { node: node_id };
            let Some(n) = self.inventory.nodes.get(&label.node) else {
                // Revoked: its series go with it.
                self.metrics.forget_node(&label);
                continue;
            };
            self.metrics.node_up.get_or_create(&label).set(n.up as i64);
            self.metrics
                .node_libvirt_up
                .get_or_create(&label)
                .set(n.libvirt_up as i64);
        }
        self.metrics.vms_duplicate.set(totals.duplicates);
        for (resource, n) in [("net", totals.idle_net), ("disk", totals.idle_disk)] {
            self.metrics
                .vms_idle
                .get_or_create(&ResourceLabel { resource })
                .set(n);
        }
        // Every label, zeros too: an alert on `vmwatch_vms{state="unknown"}` has a series.
        for (state, n) in STATE_LABELS.iter().zip(totals.by_state) {
            self.metrics.vms.get_or_create(&StateLabel { state }).set(n);
        }
    }
}

/// The `vmwatch_vms` labels: the protocol's states, `unknown`, and `other` for a node's own
/// words (only fixed vocabulary becomes a label).
const STATE_LABELS: [&str; vmwatch_common::protocol::STATES.len() + 2] = {
    let mut labels = [rules::UNKNOWN; vmwatch_common::protocol::STATES.len() + 2];
    let mut i = 0;
    while i < vmwatch_common::protocol::STATES.len() {
        labels[i] = vmwatch_common::protocol::STATES[i];
        i += 1;
    }
    labels[i + 1] = "other";
    labels
};

/// One node's VM rows, counted for the gauges.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    by_state: [i64; STATE_LABELS.len()],
    idle_net: i64,
    idle_disk: i64,
    duplicates: i64,
}

impl Counts {
    fn of<'a>(vms: impl Iterator<Item = &'a rules::Vm>) -> Counts {
        let mut c = Counts::default();
        for vm in vms {
            let i = STATE_LABELS
                .iter()
                .position(|s| *s == vm.state)
                .unwrap_or(STATE_LABELS.len() - 1);
            c.by_state[i] += 1;
            c.idle_net += i64::from(vm.usage.net.idle);
            c.idle_disk += i64::from(vm.usage.disk.idle);
            c.duplicates += i64::from(vm.duplicate);
        }
        c
    }

    fn add(&mut self, o: &Counts, sign: i64) {
        for (a, b) in self.by_state.iter_mut().zip(o.by_state) {
            *a += sign * b;
        }
        self.idle_net += sign * o.idle_net;
        self.idle_disk += sign * o.idle_disk;
        self.duplicates += sign * o.duplicates;
    }
}

/// The gauges' counts, kept per node and recounted only for the nodes whose VM rows a batch
/// wrote (a recount of 500,000 rows every second was a fifth of an idle master's CPU). A node
/// row written (every heartbeat) only refreshes that node's own gauges.
#[derive(Debug, Default)]
struct Tally {
    per_node: HashMap<String, Counts>,
    totals: Counts,
    /// Nodes whose node row was written since the last update.
    node_rows: HashSet<String>,
    /// Nodes some of whose VM rows were written or removed since the last update.
    vm_rows: HashSet<String>,
    built: bool,
}

/// What one `Tally::update` did.
#[derive(Debug)]
struct Updated {
    /// Nodes whose `node_up`/`node_libvirt_up` gauges are to be set.
    node_rows: Vec<String>,
    totals: Counts,
}

impl Tally {
    fn note(&mut self, effects: &[Effect]) {
        for e in effects {
            let (set, node_id) = match e {
                Effect::UpsertNode(n) => (&mut self.node_rows, &*n.node_id),
                Effect::UpsertVm(vm) => (&mut self.vm_rows, &*vm.node_id),
                Effect::RemoveVm { node_id, .. } => (&mut self.vm_rows, node_id.as_str()),
                Effect::RemoveNode { node_id } => (&mut self.node_rows, node_id.as_str()),
                Effect::Journal(_)
                | Effect::Activity { .. }
                | Effect::EnrollmentJournaled { .. } => continue,
            };
            if !set.contains(node_id) {
                set.insert(node_id.to_owned());
            }
        }
    }

    /// Recounts the nodes whose VM rows were written (every node the first time).
    fn update(&mut self, inv: &Inventory) -> Updated {
        if !self.built {
            self.built = true;
            self.node_rows = inv.nodes.keys().cloned().collect();
            self.vm_rows = inv.vms.keys().cloned().collect();
        }
        for node_id in self.vm_rows.drain() {
            let counts = Counts::of(inv.vms.get(&node_id).into_iter().flat_map(|m| m.values()));
            let old = self.per_node.insert(node_id, counts).unwrap_or_default();
            self.totals.add(&old, -1);
            self.totals.add(&counts, 1);
        }
        Updated {
            node_rows: self.node_rows.drain().collect(),
            totals: self.totals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Vm;

    fn vm(node: &str, uuid: &str, state: &str) -> Vm {
        Vm::for_test(node, uuid, state)
    }

    fn recount(inv: &Inventory) -> Counts {
        Counts::of(inv.vms.values().flat_map(|m| m.values()))
    }

    /// The incremental totals equal a recount of every row after writes and removals.
    #[test]
    fn the_tally_follows_written_rows() {
        let mut inv = Inventory::default();
        for (node, uuid, state) in [
            ("a", "1", "running"),
            ("a", "2", "shutoff"),
            ("b", "3", "odd"),
        ] {
            inv.vms
                .entry(node.into())
                .or_default()
                .insert(vm(node, uuid, state));
        }
        let mut tally = Tally::default();
        assert_eq!(tally.update(&inv).totals, recount(&inv));
        let other = STATE_LABELS.iter().position(|s| *s == "other").unwrap();
        assert_eq!(
            tally.totals.by_state[other], 1,
            "a node's own word counts as other"
        );

        let mut changed = vm("a", "1", "paused");
        changed.duplicate = true;
        changed.usage.net.idle = true;
        inv.vms.get_mut("a").unwrap().insert(changed.clone());
        inv.vms.get_mut("b").unwrap().remove("3");
        tally.note(&[
            Effect::UpsertVm(changed),
            Effect::RemoveVm {
                node_id: "b".into(),
                uuid: "3".into(),
            },
        ]);
        assert_eq!(tally.vm_rows.len(), 2, "both nodes are recounted");
        let updated = tally.update(&inv);
        let totals = updated.totals;
        assert_eq!(totals, recount(&inv));
        assert_eq!((totals.duplicates, totals.idle_net), (1, 1));
        assert!(
            tally.vm_rows.is_empty() && tally.node_rows.is_empty(),
            "an update consumes what was written: nothing is recounted twice"
        );
        // A heartbeat writes only the node row: its gauges, no recount.
        let mut node = crate::rules::Node::for_test("a");
        node.up = true;
        inv.nodes.insert("a".into(), node.clone());
        tally.note(&[Effect::UpsertNode(node)]);
        assert!(
            tally.vm_rows.is_empty(),
            "a node row alone recounts nothing"
        );
        let updated = tally.update(&inv);
        assert_eq!(updated.node_rows, vec!["a".to_owned()]);
        assert_eq!(updated.totals, recount(&inv));
    }
}
