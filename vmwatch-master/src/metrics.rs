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
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
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
    pub api_waiters: Gauge,
    pub zmq_connections: Gauge,
    pub zmq_connections_refused: Counter,
    pub zmq_handshake_failures: Counter,
    /// Node-port connections the master closed, by why (SPEC §11, §10).
    pub zmq_connections_closed: Family<ReasonLabel, Counter>,
    /// Bytes received on node-port connections that are not yet whole messages read by ingest.
    pub zmq_pending_bytes: Gauge,
    pub enrolled_nodes: Gauge,
    /// 1 on the master that leads (every master without `ha`), 0 on a standby (SPEC §13).
    pub ha_leader: Gauge,
    /// The leader lease's epoch this master last saw (its own while it leads).
    pub ha_epoch: Gauge,
    /// Times this process became leader or stepped down.
    pub ha_transitions: Counter,
    /// Node ids that sent on a connection holding the fleet transport key since start.
    pub fleet_transport_nodes: Gauge,
    pub http_connections: Gauge,
    pub http_connections_refused: Counter,
    pub http_connections_refused_per_address: Counter,
    pub dead_letters: Gauge,
    pub db_ok: Gauge,
    pub bus_published: Counter,
    pub bus_confirm: Histogram,
    pub bus_lag: Gauge,
    pub bus_in_flight: Gauge,
    pub bus_up: Gauge,
    pub bus_failures: Counter,
}

/// Registers `metric` under `name` and hands it back (metrics are cheap shared handles).
fn reg<M: prometheus_client::registry::Metric + Clone>(
    r: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    r.register(name, help, metric.clone());
    metric
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    pub resource: &'static str,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("vmwatch");
        let node_gauge = Family::<NodeLabel, Gauge>::default;
        // Fields are evaluated in the order written: the registry is moved in last.
        let m = Metrics {
            accepted: reg(&mut r, "messages_accepted", "Messages authenticated and applied, by kind", Family::default()),
            rejected: reg(&mut r, "messages_rejected", "Messages rejected, by reason", Family::default()),
            gaps: reg(&mut r, "sequence_gaps", "Sequence jumps seen (messages lost between node and master)", Counter::default()),
            lost: reg(&mut r, "messages_lost", "Messages missing in sequence gaps", Counter::default()),
            ingest_latency: reg(
                &mut r,
                "ingest_latency_seconds",
                "From the node's send time to the database commit",
                Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            commit_seconds: reg(
                &mut r,
                "db_commit_seconds",
                "Time of one database batch commit",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            journal_entries: reg(&mut r, "journal_entries", "Journal entries written", Counter::default()),
            nodes_up: reg(&mut r, "nodes_up", "Nodes currently up", Gauge::default()),
            nodes_down: reg(&mut r, "nodes_down", "Nodes currently down", Gauge::default()),
            node_up: reg(&mut r, "node_up", "1 if the node is up", node_gauge()),
            node_libvirt_up: reg(&mut r, "node_libvirt_up", "1 if the node reports libvirt up", node_gauge()),
            vms: reg(&mut r, "vms", "VM rows by state", Family::default()),
            vms_idle: reg(&mut r, "vms_idle", "VM rows flagged idle, by resource (net, disk)", Family::default()),
            vms_duplicate: reg(&mut r, "vms_duplicate", "VM rows flagged duplicate", Gauge::default()),
            journal_size: reg(&mut r, "journal_size", "Journal entries stored", Gauge::default()),
            agent_sent: reg(
                &mut r,
                "node_agent_sent_messages",
                "Messages the node agent handed to ZeroMQ since it started (from its heartbeat)",
                node_gauge(),
            ),
            agent_events: reg(
                &mut r,
                "node_agent_events",
                "Lifecycle events the node agent sent since it started (from its heartbeat)",
                node_gauge(),
            ),
            agent_dropped: reg(
                &mut r,
                "node_agent_dropped_messages",
                "Messages the node agent dropped on a full queue since it started (from its heartbeat)",
                node_gauge(),
            ),
            agent_overflow: reg(
                &mut r,
                "node_agent_overflow_messages",
                "Messages waiting beyond the node agent's ZeroMQ queue (from its heartbeat)",
                node_gauge(),
            ),
            agent_reconnects: reg(
                &mut r,
                "node_agent_libvirt_reconnects",
                "Reconnections of the node agent to libvirt since it started (from its heartbeat)",
                node_gauge(),
            ),
            outbox_depth: reg(&mut r, "outbox_depth", "Journal entries waiting for the panel webhook", Gauge::default()),
            webhook_deliveries: reg(
                &mut r,
                "webhook_deliveries",
                "Journal entries acknowledged by the panel (2xx)",
                Counter::default(),
            ),
            webhook_failures: reg(&mut r, "webhook_failures", "Failed webhook attempts (each is retried)", Counter::default()),
            webhook_latency: reg(
                &mut r,
                "webhook_latency_seconds",
                "From journal entry to the panel's 2xx",
                Histogram::new(exponential_buckets(0.001, 2.0, 20)),
            ),
            db_ok: {
                let g = reg(&mut r, "db_ok", "1 while database commits succeed, 0 while they fail (the batch is held and retried)", Gauge::default());
                g.set(1);
                g
            },
            bus_published: reg(
                &mut r,
                "bus_published",
                "Journal entries the event bus's broker confirmed",
                Counter::default(),
            ),
            bus_confirm: reg(
                &mut r,
                "bus_confirm_seconds",
                "From publishing a journal entry to the broker's confirm",
                Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            ),
            bus_lag: reg(&mut r, "bus_lag", "Journal entries the broker has not confirmed yet (the cursor's lag)", Gauge::default()),
            bus_in_flight: reg(&mut r, "bus_in_flight", "Journal entries published and waiting for the broker's confirm", Gauge::default()),
            bus_up: reg(&mut r, "bus_up", "1 while the master holds a connection to the event bus's broker", Gauge::default()),
            bus_failures: reg(&mut r, "bus_failures", "Failed connections to the broker and lost or refused publishes (each is retried)", Counter::default()),
            api_waiters: reg(&mut r, "api_waiters", "Requests waiting in GET /api/v1/vms/{uuid}/wait", Gauge::default()),
            db_errors: reg(&mut r, "db_errors", "Failed database batches", Counter::default()),
            zmq_connections: reg(&mut r, "zmq_connections", "TCP connections held on the node port", Gauge::default()),
            zmq_connections_refused: reg(
                &mut r,
                "zmq_connections_refused",
                "Connections on the node port closed as they were accepted because max_connections were held, or max_connections_per_address from their address",
                Counter::default(),
            ),
            zmq_connections_closed: reg(
                &mut r,
                "zmq_connections_closed",
                "Node-port connections the master closed: unfinished_message (one connection held more than its bound of bytes not yet whole messages), memory_total (all connections together did), revoked (its node was revoked), max_connections and per_address (closed as accepted)",
                Family::default(),
            ),
            zmq_pending_bytes: reg(
                &mut r,
                "zmq_pending_bytes",
                "Bytes received on node-port connections that ingest has not yet read as whole messages (what libzmq holds for them), at the last check",
                Gauge::default(),
            ),
            enrolled_nodes: reg(&mut r, "enrolled_nodes", "Node ids enrolled and not revoked", Gauge::default()),
            ha_leader: reg(&mut r, "ha_leader", "1 if this master is the leader (ingests, runs the webhook, bus and retention); 0 on a standby", Gauge::default()),
            ha_epoch: reg(&mut r, "ha_epoch", "The leader lease's epoch (the fencing token) this master last saw", Gauge::default()),
            ha_transitions: reg(&mut r, "ha_transitions", "Times this master became leader or stepped down", Counter::default()),
            fleet_transport_nodes: reg(
                &mut r,
                "fleet_transport_nodes",
                "Node ids that sent on a connection presenting the old fleet transport key since the master started (move them to their own node_key)",
                Gauge::default(),
            ),
            zmq_handshake_failures: reg(
                &mut r,
                "zmq_handshake_failures",
                "CURVE handshakes that failed (no key, a wrong key, a timeout or a protocol error)",
                Counter::default(),
            ),
            dead_letters: reg(&mut r, "dead_letters", "Journal entries the panel refused for good (GET /api/v1/dead-letters)", Gauge::default()),
            http_connections: reg(&mut r, "http_connections", "HTTP connections open", Gauge::default()),
            http_connections_refused: reg(
                &mut r,
                "http_connections_refused",
                "HTTP connections closed at once because the connection cap was reached",
                Counter::default(),
            ),
            http_connections_refused_per_address: reg(
                &mut r,
                "http_connections_refused_per_address",
                "HTTP connections closed at once because their address held half the cap (256)",
                Counter::default(),
            ),
            registry: r,
        };
        for reason in Reject::ALL {
            // Every reason is exported from the start, at zero.
            let _ = m.rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        m
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

    /// Drops every per-node series of a node that left the inventory (revoked).
    pub fn forget_node(&self, label: &NodeLabel) {
        for family in [
            &self.node_up,
            &self.node_libvirt_up,
            &self.agent_sent,
            &self.agent_events,
            &self.agent_dropped,
            &self.agent_overflow,
            &self.agent_reconnects,
        ] {
            family.remove(label);
        }
    }

    pub fn count_reject(&self, reason: Reject) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
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
