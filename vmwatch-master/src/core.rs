//! The core thread: the one writer. Feeds authenticated messages to the rules in batches,
//! writes the effects in one transaction per batch, then updates metrics and wakes waiters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmwatch_common::daemon::{Pulse, Shutdown};
use vmwatch_common::protocol::{AgentCounters, Rejected};
use vmwatch_common::time::now_ms;

use crate::ingest::Received;
use crate::metrics::{KindLabel, Metrics, NodeLabel, RejectLog, ResourceLabel, StateLabel};
use crate::rules::{self, Effect, Inventory, Rules, VmChange};
use crate::store::Store;

/// Most messages applied in one transaction.
const MAX_BATCH: usize = 4096;

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
}

/// A decided batch: its effects and what to count once it is committed.
pub struct Decided {
    effects: Vec<Effect>,
    accepted: Vec<(&'static str, u64)>,
    gaps: Vec<(String, u64)>,
}

pub struct Core {
    /// A batch whose commit failed (disk full, I/O error): retried before anything new is
    /// read, so ingest pushes back and nothing accepted is lost.
    pending: Option<Decided>,
    store: Store,
    inventory: Inventory,
    rules: Rules,
    metrics: Arc<Metrics>,
    reject_log: Arc<RejectLog>,
    /// From when every node is given a full node_timeout (the start, or the end of an outage).
    started_at: u64,
    shared: Arc<Shared>,
    retention_days: u64,
    /// The agent counters of the heartbeats since the gauges were last updated (a gauge per
    /// node and counter: set once a second, not once a heartbeat).
    agents: HashMap<String, AgentCounters>,
}

impl Core {
    pub fn new(
        store: Store,
        inventory: Inventory,
        rules: Rules,
        retention_days: u64,
        metrics: Arc<Metrics>,
        reject_log: Arc<RejectLog>,
        shared: Arc<Shared>,
    ) -> Core {
        Core {
            pending: None,
            store,
            inventory,
            rules,
            metrics,
            reject_log,
            started_at: now_ms(),
            shared,
            retention_days,
            agents: HashMap::new(),
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
        let mut next_liveness = Instant::now();
        let mut next_gauges = Instant::now();
        let mut next_purge = Instant::now() + Duration::from_secs(60);
        loop {
            self.shared.pulse.beat(now_ms());
            if let Some(decided) = self.pending.take() {
                let stopping = self.shared.shutdown.is_triggered();
                if let Err(decided) = self.commit(decided) {
                    if stopping {
                        let n = decided.effects.len();
                        tracing::error!(
                            writes = n,
                            "stopping with a batch the database still refuses; it is lost"
                        );
                        return;
                    }
                    self.pending = Some(decided);
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                // Messages queued meanwhile carry their arrival times: judged by the clock now,
                // every node would look silent for the whole outage. Like after a restart, each
                // node gets a full node_timeout from here.
                self.started_at = now_ms();
                tracing::info!("database writes succeed again; the held batch is committed");
            }
            let mut batch = Vec::new();
            let mut closed = false;
            match rx.recv_timeout(Duration::from_millis(250)) {
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
            let liveness_due = Instant::now() >= next_liveness;
            if !batch.is_empty() || liveness_due {
                self.process(batch, liveness_due);
                if liveness_due {
                    next_liveness = Instant::now() + Duration::from_secs(1);
                }
            }
            if Instant::now() >= next_purge {
                self.purge();
                next_purge =
                    Instant::now() + Duration::from_millis(crate::retention::PURGE_EVERY_MS);
            }
            if Instant::now() >= next_gauges {
                self.update_gauges();
                next_gauges = Instant::now() + Duration::from_secs(1);
            }
            // A batch this turn could not commit is retried (or reported lost) first.
            if closed && self.pending.is_none() {
                self.update_gauges();
                return;
            }
        }
    }

    fn process(&mut self, batch: Vec<Received>, liveness: bool) {
        let now = now_ms();
        let mut effects: Vec<Effect> = Vec::new();
        let mut accepted: Vec<(&'static str, u64)> = Vec::with_capacity(batch.len());
        let mut gaps = Vec::new();
        for received in batch {
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
        if liveness {
            effects.extend(rules::check_liveness(
                &mut self.inventory,
                &self.rules,
                now,
                self.started_at,
            ));
            effects.extend(crate::duplicate::check(
                &mut self.inventory,
                now,
                self.rules.duplicate_grace_ms,
            ));
        }
        if effects.is_empty() {
            return;
        }
        let decided = Decided {
            effects: rules::coalesce(effects),
            accepted,
            gaps,
        };
        if let Err(decided) = self.commit(decided) {
            self.pending = Some(decided);
        }
    }

    /// Commits one decided batch, then counts, logs and wakes waiters; on failure hands the
    /// batch back to be retried (the in-memory inventory already reflects it).
    fn commit(&mut self, decided: Decided) -> Result<(), Decided> {
        let Decided {
            effects,
            accepted,
            gaps,
        } = &decided;
        let started = Instant::now();
        let ids = match self.store.commit(effects) {
            Ok(ids) => ids,
            Err(e) => {
                self.metrics.db_errors.inc();
                if self.shared.db_ok.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "database write failed; holding the batch and retrying every 0.5 s (ingest pushes back meanwhile)");
                }
                return Err(decided);
            }
        };
        self.shared.db_ok.store(true, Ordering::Relaxed);
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
                .get_or_create(&KindLabel {
                    kind: (*kind).into(),
                })
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
                tracing::info!(node_id = %j.node_id, uuid = %j.uuid, name = %j.name, r#type = j.kind.as_str(), event = %j.event, detail = %j.detail, state = %j.state, "journal");
            }
        }
        self.shared.committed.send_modify(|n| *n += 1);
        let changes = rules::vm_changes(effects);
        if !changes.is_empty() {
            // No receiver (no waiter) is fine.
            let _ = self.shared.vm_changes.send(Arc::new(changes));
        }
        Ok(())
    }

    fn purge(&mut self) {
        let Some(cutoff) = crate::retention::cutoff(now_ms(), self.retention_days) else {
            return;
        };
        match self.store.purge_journal(cutoff) {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.journal_size.dec_by(n as i64);
                tracing::info!(
                    purged = n,
                    retention_days = self.retention_days,
                    "old journal entries purged"
                );
            }
            Err(e) => tracing::error!(error = %e, "journal purge failed; retrying in an hour"),
        }
    }

    fn update_gauges(&mut self) {
        for (node, agent) in self.agents.drain() {
            self.metrics.set_agent(&node, &agent);
        }
        let up = self.inventory.nodes.values().filter(|n| n.up).count() as i64;
        self.metrics.nodes_up.set(up);
        self.metrics
            .nodes_down
            .set(self.inventory.nodes.len() as i64 - up);
        for n in self.inventory.nodes.values() {
            let label = NodeLabel {
                node: n.node_id.clone(),
            };
            self.metrics.node_up.get_or_create(&label).set(n.up as i64);
            self.metrics
                .node_libvirt_up
                .get_or_create(&label)
                .set(n.libvirt_up as i64);
        }
        let mut by_state: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        let (mut idle_net, mut idle_disk, mut duplicates) = (0, 0, 0);
        for vm in self.inventory.vms.values().flat_map(|m| m.values()) {
            // Only fixed vocabulary becomes a label: a node's own words are counted as `other`.
            let state = vmwatch_common::protocol::STATES
                .iter()
                .chain(&[rules::UNKNOWN])
                .find(|s| **s == vm.state)
                .copied()
                .unwrap_or("other");
            *by_state.entry(state).or_default() += 1;
            idle_net += i64::from(vm.usage.net.idle);
            idle_disk += i64::from(vm.usage.disk.idle);
            duplicates += i64::from(vm.duplicate);
        }
        self.metrics.vms_duplicate.set(duplicates);
        self.metrics
            .vms_idle
            .get_or_create(&ResourceLabel {
                resource: "net".into(),
            })
            .set(idle_net);
        self.metrics
            .vms_idle
            .get_or_create(&ResourceLabel {
                resource: "disk".into(),
            })
            .set(idle_disk);
        self.metrics.vms.clear();
        for (state, n) in by_state {
            self.metrics
                .vms
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(n);
        }
    }
}
