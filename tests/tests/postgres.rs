//! The PostgreSQL store end to end (SPEC §12): PostgreSQL stopped for 20 s under load from a
//! real node with a real guest and simulated nodes, and `vmwatch-master migrate` of a populated
//! SQLite install, compared through the API.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmwatch_common::protocol::{Body, DomainEvent};
use vmwatch_common::time::now_ms;
use vmwatch_master::rules::Effect;
use vmwatch_master::store::{Outbox, Store};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::pg;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node};
use vmwatch_tests::require_root_env;
use vmwatch_tests::sim::{curve_push, heartbeat, SimNode};

/// A simulated node's lifecycle event: VM `n % 20` paused (even `n`) or resumed (odd).
fn load_event(n: u64) -> Body {
    let (event, detail, state) = if n % 40 < 20 {
        ("suspended", "paused", "paused")
    } else {
        ("resumed", "unpaused", "running")
    };
    Body::Event(DomainEvent {
        uuid: format!("7e57da7a-0000-4000-8000-{:012}", n % 20),
        name: format!("load-{}", n % 20),
        event: event.into(),
        detail: detail.into(),
        state: state.into(),
        reason: "user".into(),
        event_ts: now_ms(),
    })
}

#[test]
fn postgres_stopped_under_load_loses_nothing_accepted() {
    if !require_root_env("postgres_stopped_under_load_loses_nothing_accepted") {
        return;
    }
    let cluster = pg::Cluster::start(&format!("vmwatch-pg-outage-{}", std::process::id()))
        .expect("a private cluster of this test's own");
    let url = cluster.create_database("outage").expect("database");
    let pw = cluster.password_file.display().to_string();
    let lv = PrivateLibvirtd::start("pgout").expect("private libvirtd");
    let dir = temp_dir("pg-outage");
    let master = Master::start(&dir, &[("database", &url), ("database_password_file", &pw)])
        .expect("master");
    let _node = Node::start(&dir, "pgout", &master.endpoint(), &lv.uri(), &[]).expect("node");
    let uuid = lv.define_guest("steady", GuestKind::Idle).expect("guest");
    lv.virsh(&["start", "steady"]).expect("start");
    wait_for(Duration::from_secs(30), "the real guest running", || {
        master.vm_state(&uuid, "pgout").filter(|s| s == "running")
    });

    // Simulated load: a node sending lifecycle events every 3 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let endpoint = master.endpoint();
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let push = curve_push(&ctx).expect("socket");
            push.set_sndhwm(0).expect("sndhwm");
            push.connect(&endpoint).expect("connect");
            let mut sim = SimNode::new("load", now_ms()).expect("node");
            push.send_multipart(sim.message_now(heartbeat()), 0)
                .expect("send");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                push.send_multipart(sim.message_now(load_event(sent)), 0)
                    .expect("send");
                sent += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            // Delivered before the socket goes (linger is infinite by default).
            sent
        })
    };
    wait_for(Duration::from_secs(20), "load journaled", || {
        (master.events("node=load&type=lifecycle").ok()?.len() >= 300).then_some(())
    });

    cluster.stop().expect("stop PostgreSQL");
    let down_at = Instant::now();
    wait_for(
        Duration::from_secs(10),
        "/healthz 503 with PostgreSQL stopped",
        || (master.get_raw("/healthz").ok()?.0 == 503).then_some(()),
    );
    let (_, health) = master.get_raw("/healthz").expect("healthz");
    let health: Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["db"], "failing", "{health}");
    // The real guest acts while the database is away.
    lv.virsh(&["suspend", "steady"]).expect("suspend");
    wait_for(Duration::from_secs(30), "20 s of outage", || {
        let status = master.get_raw("/healthz").ok()?.0;
        assert_eq!(status, 503, "healthy with PostgreSQL stopped");
        (down_at.elapsed() >= Duration::from_secs(20)).then_some(())
    });
    lv.virsh(&["resume", "steady"]).expect("resume");
    cluster.restart().expect("start PostgreSQL again");
    let up_at = Instant::now();
    wait_for(Duration::from_secs(30), "/healthz 200 again", || {
        (master.get_raw("/healthz").ok()?.0 == 200).then_some(())
    });
    eprintln!(
        "ingestion resumed {:?} after PostgreSQL came back",
        up_at.elapsed()
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().expect("load thread");

    wait_for(
        Duration::from_secs(60),
        "every sent event journaled",
        || {
            (master
                .events("node=load&type=lifecycle")
                .unwrap_or_default()
                .len() as u64
                >= sent)
                .then_some(())
        },
    );
    let journaled = master
        .events("node=load&type=lifecycle")
        .unwrap_or_default();
    assert_eq!(
        journaled.len() as u64,
        sent,
        "each accepted event exactly once"
    );
    let stamps: Vec<u64> = journaled
        .iter()
        .map(|e| e["event_ts"].as_u64().expect("event_ts"))
        .collect();
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "journaled in the order sent"
    );
    for reason in ["too_old", "replay", "future"] {
        assert_eq!(master.rejected(reason), 0.0, "{reason}");
    }
    // The real guest's pause and resume during the outage are journaled, and the inventory
    // equals libvirt.
    wait_for(Duration::from_secs(30), "the guest's outage events", || {
        let events: Vec<String> = master
            .events(&format!("uuid={uuid}&type=lifecycle"))
            .ok()?
            .iter()
            .filter_map(|e| e["event"].as_str().map(str::to_owned))
            .collect();
        (events.ends_with(&["suspended".to_owned(), "resumed".to_owned()])).then_some(())
    });
    master.wait_matches_libvirt(&lv, "pgout", Duration::from_secs(10));
    // Every connection came back by itself: no statement of a dead connection was used on its
    // successor.
    let log = master.log_text();
    assert!(
        !log.contains("does not exist"),
        "a stale prepared statement"
    );
    eprintln!(
        "{sent} events sent under load, PostgreSQL stopped 20 s: all {} journaled in order",
        journaled.len()
    );
}

/// The API's answers that must not change across a migration.
fn api_answers(master: &Master, uuid: &str, from: u64, to: u64) -> Vec<(String, Value)> {
    [
        "/api/v1/vms?limit=1000".to_owned(),
        "/api/v1/nodes".to_owned(),
        "/api/v1/events?limit=1000".to_owned(),
        "/api/v1/dead-letters".to_owned(),
        format!("/api/v1/vms/{uuid}"),
        format!("/api/v1/vms/{uuid}/activity?from={from}&to={to}"),
    ]
    .into_iter()
    .map(|path| {
        let v = master
            .get(&path)
            .unwrap_or_else(|e| panic!("{path}: {e:#}"));
        (path, v)
    })
    .collect()
}

#[test]
fn migrate_moves_a_sqlite_install_and_the_api_answers_the_same() {
    if !require_root_env("migrate_moves_a_sqlite_install_and_the_api_answers_the_same") {
        return;
    }
    let cluster = pg::cluster().expect("the private cluster");
    let url = cluster.create_database("migrated").expect("database");
    let pw = cluster.password_file.display().to_string();
    let dir = temp_dir("pg-migrate");
    let sqlite = dir.join("master.db");
    let sqlite_path = sqlite.display().to_string();
    // A panel that never answers: every entry waits in the outbox.
    let mut master = Master::start(
        &dir,
        &[
            ("db_path", &sqlite_path),
            ("panel_url", "http://127.0.0.1:9/hook"),
            ("panel_secret", "a-panel-secret-of-enough-length-0"),
        ],
    )
    .expect("master on SQLite");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let mut sim = SimNode::new("hv-mig", now_ms()).expect("node");
    push.send_multipart(sim.message_now(heartbeat()), 0)
        .expect("send");
    for n in 0..60 {
        push.send_multipart(sim.message_now(load_event(n)), 0)
            .expect("send");
    }
    wait_for(Duration::from_secs(20), "the events journaled", || {
        (master.events("node=hv-mig&type=lifecycle").ok()?.len() == 60).then_some(())
    });
    master.stop().expect("stop");
    drop(push);

    // Dead letters and activity, written as the master writes them.
    let events = {
        let mut reader = vmwatch_master::store::Reader::open(&sqlite).expect("reader");
        reader
            .events(&vmwatch_master::store::EventFilter {
                limit: 10,
                ..Default::default()
            })
            .expect("events")
    };
    let mut outbox = Outbox::open(&sqlite).expect("outbox");
    outbox
        .dead_letter(events[1].id, 410, 3, now_ms())
        .expect("dead letter");
    outbox
        .dead_letter(events[2].id, 400, 1, now_ms())
        .expect("dead letter");
    let uuid = "7e57da7a-0000-4000-8000-000000000003";
    let end = now_ms() - 3_600_000;
    let points: Vec<Effect> = (0..12u64)
        .map(|i| Effect::Activity {
            node_id: "hv-mig".into(),
            uuid: uuid.into(),
            point: vmwatch_master::activity::Point {
                ts: end - 12 * 600_000 + (i + 1) * 600_000,
                window_ms: 600_000,
                deltas: [Some(i); 9],
                idle_net: i < 3,
                idle_disk: false,
            },
        })
        .collect();
    Store::open(&sqlite)
        .expect("store")
        .commit(&points)
        .expect("activity");

    master.restart().expect("master on SQLite again");
    let (from, to) = (end - 86_400_000, end + 1);
    let before = api_answers(&master, uuid, from, to);
    assert_eq!(
        before[3].1["dead_letters"].as_array().map(Vec::len),
        Some(2),
        "{}",
        before[3].1
    );
    assert!(
        before[5].1["points"]
            .as_array()
            .is_some_and(|p| p.len() == 12),
        "{}",
        before[5].1
    );
    master.stop().expect("stop");

    let (code, out, err) = master
        .command(&["migrate", "--to", &url, "--password-file", &pw])
        .expect("migrate");
    eprintln!("{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("verified"), "{out}");
    let journaled = before[2].1["events"].as_array().map_or(0, Vec::len);
    assert!(journaled > 60, "{}", before[2].1);
    assert!(
        out.lines()
            .any(|l| l.starts_with("journal") && l.contains(&format!(" {journaled} rows copied"))),
        "{out}"
    );

    // The same master on the PostgreSQL database.
    let text = std::fs::read_to_string(&master.config).expect("config");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("database"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + &format!("database={url}\ndatabase_password_file={pw}\n");
    vmwatch_tests::product::write_private(&master.config, &text).expect("config");
    master.database = cluster
        .database(
            url.rsplit('/')
                .next()
                .and_then(|d| d.split('?').next())
                .expect("db name"),
        )
        .expect("database");
    master.restart().expect("master on PostgreSQL");
    let after = api_answers(&master, uuid, from, to);
    for ((path, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{path} differs after the migration");
    }
    let health = master.get("/healthz").expect("healthz");
    assert_eq!(health["db"], "ok", "{health}");
    // The second run finds a database that is not empty.
    let (code, _, err) = master
        .command(&["migrate", "--to", &url, "--password-file", &pw])
        .expect("migrate");
    assert_ne!(code, 0);
    assert!(err.contains("already"), "{err}");
}
