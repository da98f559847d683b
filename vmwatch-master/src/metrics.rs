//! The master's Prometheus metrics (one registry, created in `main`) and the rate-limited
//! rejection log.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use vmwatch_common::protocol::{Reject, Rejected};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub accepted: Family<KindLabel, Counter>,
    pub rejected: Family<ReasonLabel, Counter>,
    pub gaps: Counter,
    pub lost: Counter,
    pub ingest_latency: Histogram,
    pub commit_seconds: Histogram,
    pub journal_entries: Counter,
    pub nodes_up: Gauge,
    pub nodes_down: Gauge,
    pub node_up: Family<NodeLabel, Gauge>,
    pub node_libvirt_up: Family<NodeLabel, Gauge>,
    pub vms: Family<StateLabel, Gauge>,
    pub vms_idle: Family<ResourceLabel, Gauge>,
    pub vms_duplicate: Gauge,
    pub db_errors: Counter,
    pub journal_size: Gauge,
    pub agent_sent: Family<NodeLabel, Gauge>,
    pub agent_events: Family<NodeLabel, Gauge>,
    pub agent_dropped: Family<NodeLabel, Gauge>,
    pub agent_overflow: Family<NodeLabel, Gauge>,
    pub agent_reconnects: Family<NodeLabel, Gauge>,
    pub outbox_depth: Gauge,
    pub webhook_deliveries: Counter,
    pub webhook_failures: Counter,
    pub webhook_latency: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: String,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vmwatch");
        let accepted = Family::<KindLabel, Counter>::default();
        registry.register(
            "messages_accepted",
            "Messages authenticated and applied, by kind",
            accepted.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "messages_rejected",
            "Messages rejected, by reason",
            rejected.clone(),
        );
        for r in Reject::ALL {
            // Every reason is exported from the start, at zero.
            let _ = rejected.get_or_create(&ReasonLabel {
                reason: r.as_str().into(),
            });
        }
        let gaps = Counter::default();
        registry.register(
            "sequence_gaps",
            "Sequence jumps seen (messages lost between node and master)",
            gaps.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "messages_lost",
            "Messages missing in sequence gaps",
            lost.clone(),
        );
        let ingest_latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "ingest_latency_seconds",
            "From the node's send time to the database commit",
            ingest_latency.clone(),
        );
        let commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "db_commit_seconds",
            "Time of one database batch commit",
            commit_seconds.clone(),
        );
        let journal_entries = Counter::default();
        registry.register(
            "journal_entries",
            "Journal entries written",
            journal_entries.clone(),
        );
        let nodes_up = Gauge::default();
        registry.register("nodes_up", "Nodes currently up", nodes_up.clone());
        let nodes_down = Gauge::default();
        registry.register("nodes_down", "Nodes currently down", nodes_down.clone());
        let node_up = Family::<NodeLabel, Gauge>::default();
        registry.register("node_up", "1 if the node is up", node_up.clone());
        let node_libvirt_up = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "node_libvirt_up",
            "1 if the node reports libvirt up",
            node_libvirt_up.clone(),
        );
        let vms = Family::<StateLabel, Gauge>::default();
        registry.register("vms", "VM rows by state", vms.clone());
        let vms_idle = Family::<ResourceLabel, Gauge>::default();
        registry.register(
            "vms_idle",
            "VM rows flagged idle, by resource (net, disk)",
            vms_idle.clone(),
        );
        let vms_duplicate = Gauge::default();
        registry.register(
            "vms_duplicate",
            "VM rows flagged duplicate",
            vms_duplicate.clone(),
        );
        let journal_size = Gauge::default();
        registry.register(
            "journal_size",
            "Journal entries stored",
            journal_size.clone(),
        );
        let agent = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<NodeLabel, Gauge>::default();
            registry.register(name, help, f.clone());
            f
        };
        let agent_sent = agent(
            &mut registry,
            "node_agent_sent_messages",
            "Messages the node agent handed to ZeroMQ since it started (from its heartbeat)",
        );
        let agent_events = agent(
            &mut registry,
            "node_agent_events",
            "Lifecycle events the node agent sent since it started (from its heartbeat)",
        );
        let agent_dropped = agent(
            &mut registry,
            "node_agent_dropped_messages",
            "Messages the node agent dropped on a full queue since it started (from its heartbeat)",
        );
        let agent_overflow = agent(
            &mut registry,
            "node_agent_overflow_messages",
            "Messages waiting beyond the node agent's ZeroMQ queue (from its heartbeat)",
        );
        let agent_reconnects = agent(
            &mut registry,
            "node_agent_libvirt_reconnects",
            "Reconnections of the node agent to libvirt since it started (from its heartbeat)",
        );
        let outbox_depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Journal entries waiting for the panel webhook",
            outbox_depth.clone(),
        );
        let webhook_deliveries = Counter::default();
        registry.register(
            "webhook_deliveries",
            "Journal entries acknowledged by the panel (2xx)",
            webhook_deliveries.clone(),
        );
        let webhook_failures = Counter::default();
        registry.register(
            "webhook_failures",
            "Failed webhook attempts (each is retried)",
            webhook_failures.clone(),
        );
        let webhook_latency = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        registry.register(
            "webhook_latency_seconds",
            "From journal entry to the panel's 2xx",
            webhook_latency.clone(),
        );
        let db_errors = Counter::default();
        registry.register("db_errors", "Failed database batches", db_errors.clone());
        Metrics {
            registry,
            accepted,
            rejected,
            gaps,
            lost,
            ingest_latency,
            commit_seconds,
            journal_entries,
            nodes_up,
            nodes_down,
            node_up,
            node_libvirt_up,
            vms,
            vms_idle,
            vms_duplicate,
            db_errors,
            journal_size,
            agent_sent,
            agent_events,
            agent_dropped,
            agent_overflow,
            agent_reconnects,
            outbox_depth,
            webhook_deliveries,
            webhook_failures,
            webhook_latency,
        }
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Records the counters a node reported in its heartbeat.
    pub fn set_agent(&self, node: &str, c: &vmwatch_common::protocol::AgentCounters) {
        let label = NodeLabel {
            node: node.to_owned(),
        };
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.agent_sent.get_or_create(&label).set(as_i64(c.sent));
        self.agent_events
            .get_or_create(&label)
            .set(as_i64(c.events));
        self.agent_dropped
            .get_or_create(&label)
            .set(as_i64(c.dropped));
        self.agent_overflow
            .get_or_create(&label)
            .set(as_i64(c.overflow));
        self.agent_reconnects
            .get_or_create(&label)
            .set(as_i64(c.libvirt_reconnects));
    }

    pub fn count_reject(&self, reason: Reject) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs rejections at warn level, at most one line per reason per interval, with the count of
/// those suppressed, so that a flood cannot fill the disk.
pub struct RejectLog {
    interval: Duration,
    seen: Mutex<HashMap<Reject, (Instant, u64)>>,
}

impl RejectLog {
    pub fn new(interval: Duration) -> RejectLog {
        RejectLog {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Returns how many were suppressed since the last line, if a line should be written now.
    pub fn should_log(&self, reason: Reject, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&reason) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                seen.insert(reason, (now, 0));
                Some(0)
            }
        }
    }

    pub fn log(&self, r: &Rejected) {
        if let Some(suppressed) = self.should_log(r.reason, Instant::now()) {
            tracing::warn!(
                reason = r.reason.as_str(),
                node_id = r.node_id.as_deref().unwrap_or("-"),
                detail = %r.detail,
                suppressed_since_last = suppressed,
                "message rejected (logged at most once per {}s per reason)",
                self.interval.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reject_log_is_rate_limited() {
        let log = RejectLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.should_log(Reject::Signature, t0), Some(0));
        for i in 1..100 {
            assert_eq!(
                log.should_log(Reject::Signature, t0 + Duration::from_millis(i)),
                None
            );
        }
        assert_eq!(
            log.should_log(Reject::Replay, t0),
            Some(0),
            "reasons are limited separately"
        );
        assert_eq!(
            log.should_log(Reject::Signature, t0 + Duration::from_secs(10)),
            Some(99)
        );
    }

    #[test]
    fn metrics_encode_with_prefix_and_total() {
        let m = Metrics::new();
        m.count_reject(Reject::Signature);
        let text = m.encode();
        assert!(
            text.contains("vmwatch_messages_rejected_total{reason=\"bad_signature\"} 1"),
            "{text}"
        );
        assert!(text.contains("vmwatch_messages_rejected_total{reason=\"replay\"} 0"));
    }
}
