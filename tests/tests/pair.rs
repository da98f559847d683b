//! quinn's `Pair`, for vmwatch: the node's core and the master's decisions wired together in
//! memory with simulated time: node core → wire frames → `authenticate` → rules → `Store` on a
//! temporary SQLite file. No libvirt, no socket, no root, no sleep.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmwatch_common::config::Secret;
use vmwatch_common::protocol::{authenticate, NodeId};
use vmwatch_master::rules::{self, Inventory, Rules};
use vmwatch_master::store::{EventFilter, Reader, Store};
use vmwatch_node::core::{Action, CoreConfig, Input, NodeCore, Now, Transmit};
use vmwatch_node::facts::{DomainFacts, EventFacts};
use vmwatch_tests::product::{temp_dir, Scratch};
use vmwatch_tests::sim::node_key;

const NODE: &str = "pair-hv";
/// How long a message takes from node to master in this simulation.
const LATENCY: Duration = Duration::from_millis(3);

struct Pair {
    node: NodeCore,
    now: Now,
    inventory: Inventory,
    rules: Rules,
    store: Store,
    db: PathBuf,
    /// The node's key under the tests' secret, as the master derives it.
    key: String,
    master_started: u64,
    /// Rejections by reason, as the master counted them.
    rejected: BTreeMap<&'static str, u64>,
    /// Last: outlives the store in it (see `temp_dir`).
    _dir: Scratch,
}

impl Pair {
    fn new(name: &str) -> Pair {
        let now = Now {
            mono: Instant::now(),
            unix_ms: 1_800_000_000_000,
        };
        let node = NodeCore::new(
            CoreConfig {
                node_id: NodeId::parse(NODE).unwrap(),
                secret: Secret::new(node_key(NODE)).unwrap(),
                stats_interval: Duration::from_secs(600),
                snapshot_interval: Duration::from_secs(60),
                heartbeat_interval: Duration::from_secs(30),
            },
            "pair-boot-1".into(),
            "pair-host".into(),
            now,
        );
        let dir = temp_dir(&format!("pair-{name}"));
        let db = dir.join("master.db");
        Pair {
            node,
            now,
            inventory: Inventory::default(),
            rules: Rules {
                max_nodes: 10,
                max_clock_skew_ms: 60_000,
                max_message_age_ms: 300_000,
                node_timeout_ms: 90_000,
                idle_windows: 3,
                idle_tx_packets_max: 0,
                idle_wr_reqs_max: 0,
                duplicate_grace_ms: 120_000,
                max_vms_per_node: 4096,
                min_stats_interval_ms: 1_000,
                activity_min_window_ms: 0,
            },
            store: Store::open(&db).unwrap(),
            db,
            key: node_key(NODE),
            master_started: now.unix_ms,
            rejected: BTreeMap::new(),
            _dir: dir,
        }
    }

    /// Moves time on by `d`, fires the node's timers and performs its actions against a
    /// simulated libvirt (`domains`, or down), then delivers what it sent.
    fn advance(&mut self, d: Duration, libvirt: Option<&[DomainFacts]>) {
        self.now = self.now.after(d);
        self.node.handle_timeout(self.now);
        while let Some(action) = self.node.poll_action() {
            let input = match (action, libvirt) {
                (Action::Connect { generation }, Some(_)) => Input::Connected {
                    generation,
                    libvirt_version: "10.0.0".into(),
                },
                (Action::Connect { .. }, None) => Input::ConnectFailed {
                    error: "libvirtd is down".into(),
                },
                (Action::ListDomains, Some(domains)) => Input::Listed(domains.to_vec()),
                (Action::ListDomains, None) => Input::ListFailed {
                    error: "eof".into(),
                    alive: false,
                },
                (Action::Release | Action::Notify(_), _) => continue,
            };
            self.node.handle(self.now, input);
        }
        self.deliver();
    }

    /// Feeds the node one input at the current time and delivers what it sent.
    fn input(&mut self, input: Input) {
        self.node.handle(self.now, input);
        self.deliver();
    }

    /// Node queue → frames → authenticate → rules → one committed batch, as the master's core
    /// does it (with the liveness check of that second).
    fn deliver(&mut self) {
        let at = self.now.unix_ms + LATENCY.as_millis() as u64;
        let mut effects = Vec::new();
        while let Some(m) = self.node.poll_transmit() {
            match authenticate(&m.frames, |id| (id.as_str() == NODE).then_some(&self.key)) {
                Ok(message) => match rules::handle(&mut self.inventory, &self.rules, at, message) {
                    Ok(outcome) => effects.extend(outcome.effects),
                    Err(refused) => *self.rejected.entry(refused.reason.as_str()).or_default() += 1,
                },
                Err(r) => *self.rejected.entry(r.reason.as_str()).or_default() += 1,
            }
            self.node.transmitted(Transmit::Sent);
        }
        effects.extend(rules::check_liveness(
            &mut self.inventory,
            &self.rules,
            at,
            self.master_started,
            vmwatch_master::core::MAX_BATCH_ROWS,
        ));
        self.store.commit(&rules::coalesce(effects)).unwrap();
    }

    /// The stored state of each VM row of the node, by uuid.
    fn stored_states(&self) -> BTreeMap<String, String> {
        let mut reader = Reader::open(&self.db).unwrap();
        reader
            .nodes()
            .unwrap()
            .iter()
            .for_each(|n| assert_eq!(&*n.node_id, NODE));
        ["u1", "u2"]
            .iter()
            .flat_map(|u| reader.vm(u).unwrap())
            .map(|vm| (vm.uuid.to_string(), vm.state.to_string()))
            .collect()
    }

    fn journal(&self, kind: &str) -> Vec<(String, String, String)> {
        let mut reader = Reader::open(&self.db).unwrap();
        let filter = EventFilter {
            after: 0,
            node: None,
            uuid: None,
            kind: Some(kind.into()),
            limit: 1000,
        };
        reader
            .events(&filter)
            .unwrap()
            .into_iter()
            .map(|e| (e.uuid, e.event, e.state))
            .collect()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(dir) = self.db.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn domain(uuid: &str, state: i32) -> DomainFacts {
    DomainFacts {
        uuid: uuid.into(),
        name: format!("vm-{uuid}"),
        state,
        reason: 1,
    }
}

fn states(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(u, s)| (u.to_string(), s.to_string()))
        .collect()
}

#[test]
fn a_node_core_and_the_master_rules_agree_through_an_outage() {
    let mut pair = Pair::new("outage");
    let running = [domain("u1", 1), domain("u2", 1)];
    pair.advance(Duration::ZERO, Some(&running));
    assert_eq!(
        pair.stored_states(),
        states(&[("u1", "running"), ("u2", "running")])
    );

    // A lifecycle event: the core reports the state the adapter read.
    pair.advance(Duration::from_secs(5), Some(&running));
    pair.input(Input::Event(EventFacts {
        uuid: "u2".into(),
        name: "vm-u2".into(),
        event: 5,
        detail: 0,
        reboot: false,
        event_ts: pair.now.unix_ms,
        current: Some((5, 1)),
        persistent: true,
    }));
    assert_eq!(
        pair.stored_states(),
        states(&[("u1", "running"), ("u2", "shutoff")])
    );
    assert!(pair
        .journal("lifecycle")
        .contains(&("u2".into(), "stopped".into(), "shutoff".into())));

    // libvirtd dies: the core says so at once; after node_timeout the rows read unknown.
    pair.input(Input::Closed {
        generation: 1,
        reason: 1,
    });
    assert!(
        !pair.inventory.nodes[NODE].libvirt_up,
        "the loss was not reported at once"
    );
    let mut waited = Duration::ZERO;
    while pair.stored_states()["u1"] != "unknown" {
        assert!(
            waited < Duration::from_secs(120),
            "the rows never turned unknown"
        );
        pair.advance(Duration::from_secs(5), None);
        waited += Duration::from_secs(5);
    }
    assert!(
        waited > Duration::from_secs(85),
        "unknown before node_timeout: {waited:?}"
    );
    assert_eq!(
        pair.stored_states(),
        states(&[("u1", "unknown"), ("u2", "unknown")])
    );

    // libvirtd is back (reconnect after backoff): the snapshot puts the truth back.
    let back = [domain("u1", 1), domain("u2", 3)];
    pair.advance(Duration::from_secs(31), Some(&back));
    assert_eq!(
        pair.stored_states(),
        states(&[("u1", "running"), ("u2", "paused")])
    );
    assert_eq!(pair.node.counters().libvirt_reconnects, 1);

    // The stored inventory is the one the rules hold in memory (a master restart loses
    // nothing), and no message of this one boot was rejected.
    let reloaded = pair.store.load_inventory().unwrap();
    assert_eq!(reloaded.vms, pair.inventory.vms);
    assert_eq!(reloaded.nodes, pair.inventory.nodes);
    assert!(pair.rejected.is_empty(), "{:?}", pair.rejected);
}

#[test]
fn a_node_that_stops_says_bye_and_is_down_at_once() {
    let mut pair = Pair::new("bye");
    pair.advance(Duration::ZERO, Some(&[domain("u1", 1)]));
    pair.input(Input::Stop);
    let node = &pair.inventory.nodes[NODE];
    assert!(
        !node.up,
        "a bye marks the node down without waiting for the timeout"
    );
    assert!(pair.node.is_drained());
    assert_eq!(pair.stored_states(), states(&[("u1", "unknown")]));
}
