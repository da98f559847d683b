//! The event bus against a real RabbitMQ broker (a private one per test), a real master and
//! node, and a real QEMU guest on a private libvirtd: order, the documented Python consumer,
//! a broker outage, a master killed with entries unconfirmed, and retention.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmwatch_master::store::{Conn, Purpose};
use vmwatch_tests::broker::{require_broker, Broker, BusMessage, BusQueue, PASSWORD};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node, Scratch};
use vmwatch_tests::require_root_env;

const EXCHANGE: &str = "vmwatch-test";

fn ready(test: &str) -> bool {
    require_root_env(test) && require_broker(test)
}

/// A broker, a guest running on a private libvirtd, a master publishing to the broker and a
/// node watching the libvirtd; `bind` queues are declared before the master starts, so every
/// entry is routed.
struct Rig {
    // Dropped in this order: node and master before the libvirtd and the broker.
    node: Node,
    master: Master,
    lv: PrivateLibvirtd,
    broker: Broker,
    uuid: String,
    node_id: String,
    /// Last: outlives the processes writing into it (see `temp_dir`).
    _dir: Scratch,
}

impl Rig {
    fn start(
        name: &str,
        master_extra: &[(&str, &str)],
        bind: &[(&str, &str)],
    ) -> (Rig, Vec<BusQueue>) {
        let dir = temp_dir(name);
        let broker = Broker::start(&dir.join("broker")).expect("broker");
        let queues = bind
            .iter()
            .map(|(queue, binding)| {
                BusQueue::bind(&broker.url(), EXCHANGE, queue, binding).expect("bind a queue")
            })
            .collect();
        let lv = PrivateLibvirtd::start(name).expect("libvirtd");
        let uuid = lv
            .start_guest(&format!("{name}-guest"), GuestKind::Idle)
            .expect("guest");
        let url = broker.url();
        let mut extra = vec![("bus_url", url.as_str()), ("bus_exchange", EXCHANGE)];
        extra.extend_from_slice(master_extra);
        let master = Master::start(&dir, &extra).expect("master");
        let node_id = format!("{name}.hv");
        let node = Node::start(
            &dir,
            &node_id,
            &master.endpoint(),
            &lv.uri(),
            &[("heartbeat_interval", "1")],
        )
        .expect("node");
        master.wait_matches_libvirt(&lv, &node_id, Duration::from_secs(30));
        (
            Rig {
                node,
                master,
                lv,
                broker,
                uuid,
                node_id,
                _dir: dir,
            },
            queues,
        )
    }

    /// Suspends and resumes the guest `n` times, each change seen in the API.
    fn flip(&self, n: usize) {
        for _ in 0..n {
            for (action, state) in [("suspend", "paused"), ("resume", "running")] {
                self.lv.virsh(&[action, &self.uuid]).expect(action);
                wait_for(
                    Duration::from_secs(10),
                    &format!("{state} in the API"),
                    || {
                        (self.master.vm_state(&self.uuid, &self.node_id).as_deref() == Some(state))
                            .then_some(())
                    },
                );
            }
        }
    }

    /// The journal read from the database file (the master may be frozen), as the API shows it.
    fn journal_direct(&self) -> Vec<Value> {
        let mut db = Conn::open(&self.master.database, Purpose::Migrate).expect("db");
        db.query("SELECT id FROM journal ORDER BY id", &[])
            .expect("query")
            .into_iter()
            .map(|mut r| serde_json::json!({"id": r.int(0).expect("id")}))
            .collect()
    }

    fn health(&self) -> Value {
        let (_, body) = self.master.get_raw("/healthz").expect("healthz");
        serde_json::from_str(&body).expect("healthz JSON")
    }

    /// The journal as the API shows it, `type` filtered (empty: all).
    fn journal(&self, query: &str) -> Vec<Value> {
        self.master.events(query).expect("events")
    }
}

fn ids(entries: &[Value]) -> Vec<i64> {
    entries.iter().filter_map(|e| e["id"].as_i64()).collect()
}

/// Each message is its journal entry exactly (body = the API's entry, routing key, properties).
fn assert_messages_are_the_journal(messages: &[BusMessage], journal: &[Value]) {
    for m in messages {
        let entry = journal
            .iter()
            .find(|e| e["id"] == m.id)
            .unwrap_or_else(|| panic!("message {} is not in the journal", m.id));
        assert_eq!(&m.body, entry, "message {} body", m.id);
        let word = |k: &str| entry[k].as_str().unwrap_or_default().replace('.', "-");
        assert_eq!(
            m.routing_key,
            format!(
                "vmwatch.{}.{}.{}",
                word("type"),
                word("event"),
                word("node_id")
            ),
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.delivery_mode, Some(2), "persistent");
        assert_eq!(m.timestamp, entry["received_at"].as_u64().map(|t| t / 1000));
    }
}

/// The ids in arrival order, first arrivals only, and the duplicates' ids.
fn first_arrivals(messages: &[BusMessage]) -> (Vec<i64>, Vec<i64>) {
    let mut seen = std::collections::BTreeSet::new();
    let mut first = Vec::new();
    let mut again = Vec::new();
    for m in messages {
        if seen.insert(m.id) {
            first.push(m.id);
        } else {
            again.push(m.id);
        }
    }
    (first, again)
}

fn assert_increasing(ids: &[i64], what: &str) {
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "{what} out of journal order: {ids:?}"
    );
}

#[test]
fn a_real_guests_lifecycle_arrives_on_bound_queues_in_journal_order() {
    if !ready("a_real_guests_lifecycle_arrives_on_bound_queues_in_journal_order") {
        return;
    }
    let (rig, queues) = Rig::start(
        "bus-order",
        &[],
        &[
            ("lifecycle", "vmwatch.lifecycle.#"),
            ("of-node", "vmwatch.*.*.bus-order-hv"),
        ],
    );
    rig.flip(3);
    let lifecycle = rig.journal("type=lifecycle");
    let wanted = ids(&lifecycle);
    assert!(wanted.len() >= 6, "{lifecycle:?}");
    let t0 = Instant::now();
    let got = queues[0].take_ids(&wanted, Duration::from_secs(30));
    eprintln!(
        "{} lifecycle entries on the queue ({:?} after the last API read)",
        got.len(),
        t0.elapsed()
    );
    let got_ids: Vec<i64> = got.iter().map(|m| m.id).collect();
    assert_increasing(&got_ids, "lifecycle messages");
    assert!(got
        .iter()
        .all(|m| m.routing_key.starts_with("vmwatch.lifecycle.")));
    let journal = rig.journal("");
    assert_messages_are_the_journal(&got, &journal);

    // `vmwatch.*.*.<node>` (the node id's dot is a dash): every entry of the node, all types.
    let all = ids(&journal);
    let of_node = queues[1].take_ids(&all, Duration::from_secs(30));
    let of_node_ids: Vec<i64> = of_node.iter().map(|m| m.id).collect();
    assert_increasing(&of_node_ids, "node messages");
    assert!(
        of_node.iter().any(|m| m.body["type"] == "node"),
        "node entries too"
    );
    assert_messages_are_the_journal(&of_node, &rig.journal(""));

    let health = rig.health();
    assert_eq!(health["bus"], "up", "{health}");
    wait_for(Duration::from_secs(5), "bus_lag 0", || {
        (rig.health()["bus_lag"] == 0).then_some(())
    });
    assert!(
        rig.master
            .metric("vmwatch_bus_published_total")
            .expect("metric")
            >= all.len() as f64
    );
    let log = rig.master.log_text();
    assert!(log.contains("connected to the event bus"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the broker password is in the master log"
    );
}

/// The Python consumer of docs/API.md, exactly as written there.
fn documented_consumer() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
        .expect("docs/API.md");
    let block = doc
        .split("<!-- bus-consumer: begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- bus-consumer: end -->").next())
        .expect("the bus-consumer block in docs/API.md");
    block
        .trim()
        .strip_prefix("```python")
        .and_then(|b| b.strip_suffix("```"))
        .expect("a python code block")
        .to_owned()
}

#[test]
fn the_documented_python_consumer_receives_the_lifecycle() {
    if !ready("the_documented_python_consumer_receives_the_lifecycle") {
        return;
    }
    let (rig, _) = Rig::start("bus-py", &[], &[]);
    let mut consumer = Command::new("/usr/bin/python3")
        .args(["-c", &documented_consumer()])
        .env("VMWATCH_BUS_URL", rig.broker.url())
        .env("VMWATCH_BUS_EXCHANGE", EXCHANGE)
        .env("VMWATCH_BUS_QUEUE", "docs-consumer")
        .env("VMWATCH_BUS_BINDING", "vmwatch.lifecycle.#")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let (tx, lines) = mpsc::channel();
    let stdout = consumer.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the consumer starts");
    assert_eq!(first, "bound");
    let before = ids(&rig.journal("")).last().copied().unwrap_or(0);
    rig.flip(2);
    let wanted: Vec<Value> = rig
        .journal("type=lifecycle")
        .into_iter()
        .filter(|e| e["id"].as_i64() > Some(before))
        .collect();
    assert!(wanted.len() >= 4, "{wanted:?}");
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while printed.len() < wanted.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => panic!("the consumer printed {printed:?}, expected {wanted:?}"),
        }
    }
    let _ = consumer.kill();
    let _ = consumer.wait();
    let expected: Vec<String> = wanted
        .iter()
        .map(|e| {
            format!(
                "vmwatch.lifecycle.{}.bus-py-hv {} {} {} {}",
                e["event"].as_str().unwrap_or_default(),
                e["id"],
                e["uuid"].as_str().unwrap_or_default(),
                e["event"].as_str().unwrap_or_default(),
                e["state"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(printed, expected);
}

#[test]
fn a_broker_outage_delays_nothing_and_every_entry_arrives_after_it() {
    if !ready("a_broker_outage_delays_nothing_and_every_entry_arrives_after_it") {
        return;
    }
    let (mut rig, queues) = Rig::start("bus-outage", &[], &[("all", "vmwatch.#")]);
    // --check-config shows the broker address with its password masked.
    let out = Command::new(vmwatch_tests::product::bin("vmwatch-master"))
        .args(["--check-config", "--config"])
        .arg(&rig.master.config)
        .output()
        .expect("--check-config");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "bus_url=amqp://vmwatch:********@127.0.0.1:{}/%2f",
            rig.broker.port
        )),
        "{text}"
    );
    assert!(!text.contains(PASSWORD), "{text}");
    let before = ids(&rig.journal(""));
    queues[0].take_ids(&before, Duration::from_secs(30));
    drop(queues);

    rig.broker.stop().expect("stop the broker");
    wait_for(Duration::from_secs(15), "healthz: bus down", || {
        (rig.health()["bus"] == "down").then_some(())
    });
    // Ingestion goes on: each change is in the API while the broker is down.
    let t0 = Instant::now();
    rig.flip(3);
    eprintln!(
        "6 lifecycle changes journaled with the broker down in {:?}",
        t0.elapsed()
    );
    let journal: Vec<i64> = ids(&rig.journal(""))
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    let during = journal.len();
    assert!(during >= 6);
    wait_for(Duration::from_secs(5), "the lag on /healthz", || {
        (rig.health()["bus_lag"].as_u64() >= Some(during as u64)).then_some(())
    });
    let health = rig.health();
    assert_eq!(health["status"], "ok", "ingestion is healthy: {health}");

    rig.broker.start_again().expect("restart the broker");
    let queue = BusQueue::bind(&rig.broker.url(), EXCHANGE, "all", "vmwatch.#").expect("queue");
    let t1 = Instant::now();
    let got = queue.take_ids(&journal, Duration::from_secs(60));
    eprintln!(
        "every entry arrived {:?} after the broker came back",
        t1.elapsed()
    );
    let (first, _) = first_arrivals(&got);
    assert_increasing(&first, "entries after the outage");
    assert_messages_are_the_journal(&got, &rig.journal(""));
    wait_for(Duration::from_secs(10), "healthz: bus up", || {
        (rig.health()["bus"] == "up").then_some(())
    });
    assert!(
        rig.master
            .metric("vmwatch_bus_failures_total")
            .expect("metric")
            >= 1.0
    );
    assert!(!rig.master.log_text().contains(PASSWORD));
}

#[test]
fn a_master_killed_with_entries_unconfirmed_publishes_them_again_with_the_same_id() {
    if !ready("a_master_killed_with_entries_unconfirmed_publishes_them_again_with_the_same_id") {
        return;
    }
    let (mut rig, queues) = Rig::start("bus-kill", &[], &[("all", "vmwatch.#")]);
    let before = ids(&rig.journal(""));
    queues[0].take_ids(&before, Duration::from_secs(30));

    // A frozen broker takes the publishes into its socket but confirms nothing.
    rig.broker.pause().expect("pause the broker");
    rig.flip(2);
    wait_for(
        Duration::from_secs(10),
        "entries published, unconfirmed",
        || (rig.master.metric("vmwatch_bus_in_flight").ok()? >= 1.0).then_some(()),
    );
    // The master frozen before the broker goes on: the broker stores the publishes and sends
    // confirms the master never reads; then it is killed. (Killed first, its socket's reset
    // could make the broker drop what it had not read yet, and no entry would arrive twice.)
    let pid = rig.master.pid().expect("master pid") as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    rig.broker.resume().expect("resume the broker");
    let in_flight: Vec<i64> = ids(&rig.journal_direct())
        .into_iter()
        .filter(|id| !before.contains(id))
        .take(1)
        .collect();
    let mut got = queues[0].take_ids(&in_flight, Duration::from_secs(30));
    rig.master.kill9();
    rig.master.restart().expect("master again");

    let journal: Vec<i64> = ids(&rig.journal(""))
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    got.extend(queues[0].take_ids(&journal, Duration::from_secs(60)));
    let (first, again) = first_arrivals(&got);
    assert_increasing(&first, "entries");
    eprintln!(
        "{} entries, {} published twice: {again:?}",
        first.len(),
        again.len()
    );
    assert!(
        !again.is_empty(),
        "the frozen broker kept the first publishes, so some arrive twice"
    );
    // A duplicate is the same entry under the same message_id.
    for id in &again {
        let copies: Vec<&BusMessage> = got.iter().filter(|m| m.id == *id).collect();
        assert!(copies
            .windows(2)
            .all(|w| w[0].body == w[1].body && w[0].routing_key == w[1].routing_key));
    }
    assert_messages_are_the_journal(&got, &rig.journal(""));
}

#[test]
fn retention_keeps_an_entry_the_broker_has_not_confirmed() {
    if !ready("retention_keeps_an_entry_the_broker_has_not_confirmed") {
        return;
    }
    let (mut rig, queues) = Rig::start(
        "bus-retention",
        &[("event_retention_days", "1")],
        &[("all", "vmwatch.#")],
    );
    let confirmed = ids(&rig.journal(""));
    queues[0].take_ids(&confirmed, Duration::from_secs(30));
    drop(queues);
    rig.broker.stop().expect("stop the broker");
    rig.flip(1);
    let all = ids(&rig.journal(""));
    let unconfirmed: Vec<i64> = all
        .iter()
        .copied()
        .filter(|id| !confirmed.contains(id))
        .collect();
    assert!(unconfirmed.len() >= 2);

    // Every entry two days old; the master purges at start.
    rig.master.kill9();
    let mut db = Conn::open(&rig.master.database, Purpose::Migrate).expect("db");
    db.execute(
        "UPDATE journal SET received_at = received_at - 2 * 86400000",
        &[],
    )
    .expect("age the journal");
    drop(db);
    rig.master.restart().expect("master again");
    wait_for(
        Duration::from_secs(10),
        "the confirmed entries purged",
        || {
            let left = ids(&rig.journal(""));
            (!confirmed.iter().any(|id| left.contains(id))).then_some(())
        },
    );
    let left = ids(&rig.journal(""));
    for id in &unconfirmed {
        assert!(
            left.contains(id),
            "unconfirmed entry {id} was purged; left: {left:?}"
        );
    }
    assert!(rig.master.log_text().contains("old journal entries purged"));

    rig.broker.start_again().expect("restart the broker");
    let queue = BusQueue::bind(&rig.broker.url(), EXCHANGE, "all", "vmwatch.#").expect("queue");
    queue.take_ids(&unconfirmed, Duration::from_secs(60));
    let _ = &rig.node;
}

/// `amqps://` verified against the roots the system's loader reads (`SSL_CERT_FILE` pointing
/// at a bundle with the test CA, the standard way to add one), and refused without that CA.
#[test]
fn amqps_is_verified_against_the_system_roots() {
    if !ready("amqps_is_verified_against_the_system_roots") {
        return;
    }
    let dir = temp_dir("bus-tls");
    let broker = Broker::start_tls(&dir.join("broker")).expect("broker");
    let (tls_port, ca) = broker.tls.clone().expect("tls");
    let queue = BusQueue::bind(&broker.url(), EXCHANGE, "tls", "vmwatch.#").expect("queue");
    let url = format!(
        "amqps://{}:{PASSWORD}@localhost:{tls_port}/%2f",
        vmwatch_tests::broker::USER
    );
    let extra = [("bus_url", url.as_str()), ("bus_exchange", EXCHANGE)];

    // Without the CA: the certificate is refused, nothing is published, the password unlogged.
    for sub in ["untrusted", "trusted"] {
        std::fs::create_dir_all(dir.join(sub)).expect("dir");
    }
    let untrusted = Master::start(&dir.join("untrusted"), &extra).expect("master");
    wait_for(
        Duration::from_secs(20),
        "a refused TLS handshake logged",
        || {
            untrusted
                .log_text()
                .contains("event bus unavailable")
                .then_some(())
        },
    );
    let log = untrusted.log_text();
    assert!(!log.contains("connected to the event bus"), "{log}");
    assert!(!log.contains(PASSWORD));
    drop(untrusted);

    let bundle = dir.join("roots.pem");
    let mut roots = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    roots.extend(std::fs::read(&ca).expect("test CA"));
    std::fs::write(&bundle, roots).expect("bundle");
    let bundle = bundle.display().to_string();
    let master =
        Master::start_with_env(&dir.join("trusted"), &extra, &[("SSL_CERT_FILE", &bundle)])
            .expect("master");
    wait_for(Duration::from_secs(20), "connected over TLS", || {
        master
            .log_text()
            .contains("connected to the event bus")
            .then_some(())
    });
    // A journal entry through TLS: a node's first message journals it as up.
    let lv = PrivateLibvirtd::start("bus-tls").expect("libvirtd");
    let _node = Node::start(&dir, "tls-hv", &master.endpoint(), &lv.uri(), &[]).expect("node");
    master.wait_matches_libvirt(&lv, "tls-hv", Duration::from_secs(30));
    let journal = master.events("").expect("events");
    let got = queue.take_ids(&ids(&journal), Duration::from_secs(30));
    assert_messages_are_the_journal(&got, &master.events("").expect("events"));
}

/// `amqp://user:pass@host:port/` (the pika and Celery habit) is the default vhost `/`, not the
/// empty vhost no broker has: the master connects to a real broker with it (issue 24, item 10).
#[test]
fn a_trailing_slash_url_means_the_default_vhost() {
    if !ready("a_trailing_slash_url_means_the_default_vhost") {
        return;
    }
    let dir = temp_dir("bus-slash");
    let broker = Broker::start(&dir.join("broker")).expect("broker");
    let url = broker.url();
    let slash = url
        .strip_suffix("%2f")
        .expect("the harness URL ends in %2f");
    assert!(slash.ends_with('/'), "{slash}");
    let master = Master::start(&dir, &[("bus_url", slash)]).expect("master");
    wait_for(
        Duration::from_secs(20),
        "the bus up with the trailing-slash URL",
        || {
            let (_, body) = master.get_raw("/healthz").ok()?;
            let health: Value = serde_json::from_str(&body).ok()?;
            (health["bus"] == "up").then_some(())
        },
    );
    let log = master.log_text();
    assert!(log.contains("connected to the event bus"), "{log}");
    assert!(!log.contains("vhost not found"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the broker password is in the master log"
    );
}
