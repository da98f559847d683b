//! Node identity, enrollment, revocation and containment (SPEC §10, §11) against the real
//! master: real CURVE sockets with per-node keys, the real enrollment API and CLI, a real node
//! agent on a private libvirtd, a real SQLite file.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmwatch_common::protocol::{Body, DomainState, DomainStats, Snapshot, Stats};
use vmwatch_common::time::now_ms;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{rss_kib, temp_dir, wait_for, Master, Node};
use vmwatch_tests::require_root_env;
use vmwatch_tests::sim::{curve_push, heartbeat, node_curve_push, node_key, SimNode};

/// The tests that measure memory or latency run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const TOKEN: &str = "identity-test-token-0123456789";

/// A master as a new install has it: the fleet key refused, activity merged per minute.
fn new_install(dir: &std::path::Path, extra: &[(&str, &str)]) -> Master {
    let mut all = vec![
        ("allow_fleet_transport", "no"),
        ("activity_min_window", "60"),
        ("api_token", TOKEN),
    ];
    all.extend_from_slice(extra);
    Master::start(dir, &all).expect("master")
}

fn metric(master: &Master, series: &str) -> f64 {
    master.metric_or_zero(series)
}

fn rejected(master: &Master, reason: &str) -> f64 {
    master.rejected(reason)
}

fn snapshot(uuids: &[&str]) -> Body {
    Body::Snapshot(Snapshot {
        domains: uuids
            .iter()
            .map(|u| DomainState {
                uuid: (*u).into(),
                name: format!("vm-{}", &u[..8]),
                state: "running".into(),
                reason: "booted".into(),
            })
            .collect(),
        hostname: "h".into(),
        libvirt_version: "9.0.0".into(),
    })
}

fn stats(uuid: &str, n: u64, interval_s: u64) -> Body {
    Body::Stats(Stats {
        interval_s,
        domains: vec![DomainStats {
            uuid: uuid.into(),
            name: format!("vm-{}", &uuid[..8]),
            state: "running".into(),
            tx_pkts: n,
            rx_pkts: n,
            tx_bytes: n * 100,
            rx_bytes: n * 100,
            wr_reqs: n,
            rd_reqs: n,
            wr_bytes: n * 512,
            rd_bytes: n * 512,
            cpu_time_ns: n * 1_000_000,
            nics: 1,
            disks: 1,
        }],
    })
}

fn uuid(i: u32) -> String {
    format!("{i:08x}-0000-4000-8000-000000000000")
}

/// A PUSH socket with node `id`'s own key, connected to the master.
fn connect_as(ctx: &zmq::Context, master: &Master, id: &str) -> zmq::Socket {
    let push = node_curve_push(ctx, id).expect("CURVE push socket");
    push.set_linger(0).expect("linger");
    push.connect(&master.endpoint()).expect("connect");
    push
}

/// POST/DELETE with an optional bearer token: (status, body).
fn call(
    master: &Master,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = ureq::request(method, &master.url(path)).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let (status, body) = match req.call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{method} {path}: {status} not JSON ({e}): {body}"));
    (status, json)
}

/// Sends heartbeats of `node` on `push` until the master lists it up.
fn admitted(master: &Master, push: &zmq::Socket, node: &mut SimNode, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let _ = push.send_multipart(node.message_now(heartbeat()), zmq::DONTWAIT);
        if master
            .node(node.id().as_str())
            .is_some_and(|n| n["up"] == true)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Sends one heartbeat of `node` and polls (every millisecond) until the master shows its seq:
/// the send → API latency.
fn heartbeat_latency(master: &Master, push: &zmq::Socket, node: &mut SimNode) -> Duration {
    let id = node.id().as_str().to_owned();
    let seq = |m: &Master| {
        m.node(&id)
            .and_then(|v| v["last_seq"].as_u64())
            .unwrap_or(0)
    };
    let before = seq(master);
    let t0 = Instant::now();
    push.send_multipart(node.message_now(heartbeat()), 0)
        .expect("send");
    while seq(master) <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "heartbeat of {id} not seen"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// A connection of node `id` (just enrolled) that the master admitted, and its first
/// heartbeat ingested. Each try is a fresh socket: a refused handshake is final for a libzmq
/// socket, and a CLI enrollment reaches a running master's ZAP handler within its poll.
fn enrolled_push(master: &Master, ctx: &zmq::Context, node: &mut SimNode) -> zmq::Socket {
    let id = node.id().as_str().to_owned();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let push = connect_as(ctx, master, &id);
        if admitted(master, &push, node, Duration::from_millis(250)) {
            return push;
        }
    }
    panic!("{id} not admitted within 5 s of its enrollment");
}

#[test]
fn a_node_enrolled_through_the_api_is_ingested_with_the_lines_it_returned() {
    if !require_root_env("a_node_enrolled_through_the_api_is_ingested_with_the_lines_it_returned") {
        return;
    }
    let lv = PrivateLibvirtd::start("enrolled").expect("private libvirtd");
    let dir = temp_dir("enroll-api");
    let master = new_install(&dir, &[]);

    // Enrollment changes who may send: a token is required, and a master without one refuses.
    let (status, body) = call(&master, "POST", "/api/v1/nodes/hv-api/enrollment", None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = call(
        &master,
        "POST",
        "/api/v1/nodes/bad%20id/enrollment",
        Some(TOKEN),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("node id"),
        "{body}"
    );

    let (status, first) = call(
        &master,
        "POST",
        "/api/v1/nodes/hv-api/enrollment",
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["node_id"], "hv-api");
    assert_eq!(first["new"], true);
    assert_eq!(first["connect"], serde_json::json!([master.endpoint()]));
    assert_eq!(first["secret"], node_key("hv-api"));
    let config = first["config"].as_str().expect("config lines").to_owned();
    for key in ["secret", "master_key", "node_key"] {
        let value = first[key].as_str().expect(key);
        assert!(
            config.contains(&format!("\n{key}={value}\n")),
            "{key} in {config}"
        );
    }
    // Idempotent: the same answer again, not new.
    let (status, again) = call(
        &master,
        "POST",
        "/api/v1/nodes/hv-api/enrollment",
        Some(TOKEN),
    );
    assert_eq!(status, 200);
    assert_eq!(
        (&again["config"], &again["new"]),
        (&first["config"], &false.into())
    );

    let node = Node::start_enrolled(&dir, "hv-api", &config, &lv.uri()).expect("node");
    wait_for(Duration::from_secs(30), "the enrolled node up", || {
        master
            .node("hv-api")
            .filter(|n| n["up"] == true && n["libvirt_up"] == true)
    });
    let enrolled = master.events("type=node").expect("events");
    assert!(
        enrolled
            .iter()
            .any(|e| e["node_id"] == "hv-api" && e["event"] == "enrolled"),
        "{enrolled:?}"
    );
    drop(node);

    // A master without api_token answers 403, naming what to set.
    let dir2 = temp_dir("enroll-api-403");
    let open = Master::start(&dir2, &[]).expect("master");
    let (status, body) = call(&open, "POST", "/api/v1/nodes/hv-x/enrollment", None);
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("api_token"),
        "{body}"
    );
}

#[test]
fn an_unenrolled_key_fails_the_handshake_and_the_fleet_key_needs_allowing() {
    let _s = serial();
    let dir = temp_dir("unenrolled");
    let master = new_install(&dir, &[]);
    let ctx = zmq::Context::new();
    // A correctly derived key of an id nobody enrolled.
    let push = connect_as(&ctx, &master, "ghost");
    let mut ghost = SimNode::new("ghost", now_ms()).expect("node id");
    assert!(!admitted(
        &master,
        &push,
        &mut ghost,
        Duration::from_secs(2)
    ));
    wait_for(Duration::from_secs(5), "a failed handshake counted", || {
        (metric(&master, "vmwatch_zmq_handshake_failures_total") >= 1.0).then_some(())
    });
    assert!(master.log_text().contains("CURVE handshake refused"));
    // The fleet key: refused on a new install.
    let fleet = curve_push(&ctx).expect("fleet push");
    fleet.set_linger(0).expect("linger");
    fleet.connect(&master.endpoint()).expect("connect");
    let mut old = SimNode::new("old-node", now_ms()).expect("node id");
    assert!(!admitted(&master, &fleet, &mut old, Duration::from_secs(2)));

    // Enrolled by the CLI while the master runs: accepted within a second. (A handshake the
    // master refused is never retried by libzmq: each attempt is a fresh connection, as the
    // node agent itself dials again after a refusal.)
    let t0 = Instant::now();
    master.enroll("ghost");
    let mut in_time = false;
    while t0.elapsed() < Duration::from_secs(1) {
        let push = connect_as(&ctx, &master, "ghost");
        if admitted(&master, &push, &mut ghost, Duration::from_millis(150)) {
            in_time = true;
            break;
        }
    }
    assert!(in_time, "a CLI enrollment not seen within 1 s");
    let cli_to_ingested = t0.elapsed();
    eprintln!("CLI enrollment to first message ingested: {cli_to_ingested:?}");

    // With allow_fleet_transport=yes the fleet key works, with a warning and a metric.
    let dir = temp_dir("fleet-allowed");
    let allowed = Master::start(&dir, &[("allow_fleet_transport", "yes")]).expect("master");
    let fleet = curve_push(&ctx).expect("fleet push");
    fleet.set_linger(0).expect("linger");
    fleet.connect(&allowed.endpoint()).expect("connect");
    assert!(admitted(&allowed, &fleet, &mut old, Duration::from_secs(5)));
    assert!(allowed
        .log_text()
        .contains("fleet transport key is still accepted"));
    assert_eq!(metric(&allowed, "vmwatch_fleet_transport_nodes"), 1.0);
}

#[test]
fn a_message_naming_another_enrolled_node_is_refused() {
    let _s = serial();
    let dir = temp_dir("mismatch");
    let master = new_install(&dir, &[]);
    master.enroll("hv-a");
    master.enroll("hv-b");
    let ctx = zmq::Context::new();
    let mut a = SimNode::new("hv-a", now_ms()).expect("node id");
    let push = enrolled_push(&master, &ctx, &mut a);
    // hv-a's connection sends a message correctly signed with hv-b's own HMAC secret.
    let mut b = SimNode::new("hv-b", now_ms()).expect("node id");
    push.send_multipart(b.message_now(heartbeat()), 0)
        .expect("send");
    wait_for(Duration::from_secs(5), "identity_mismatch counted", || {
        (rejected(&master, "identity_mismatch") >= 1.0).then_some(())
    });
    assert!(master.node("hv-b").is_none(), "hv-b must not appear");
    let log = master.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("identity_mismatch"))
        .expect("a log line");
    assert!(
        line.contains("hv-a") && line.contains("127.0.0.1"),
        "{line}"
    );
}

#[test]
fn revocation_refuses_a_live_connection_within_a_second_and_removes_the_rows() {
    let _s = serial();
    let dir = temp_dir("revoke");
    let master = new_install(&dir, &[]);
    master.enroll("hv-r");
    let ctx = zmq::Context::new();
    let mut node = SimNode::new("hv-r", now_ms()).expect("node id");
    let push = enrolled_push(&master, &ctx, &mut node);
    let vms = [uuid(1), uuid(2)];
    let refs: Vec<&str> = vms.iter().map(String::as_str).collect();
    push.send_multipart(node.message_now(snapshot(&refs)), 0)
        .expect("snapshot");
    wait_for(Duration::from_secs(5), "two VM rows", || {
        (master.vms_of("hv-r").ok()?.len() == 2).then_some(())
    });

    // Revoke through the API while the connection sends a heartbeat every 10 ms.
    let before = rejected(&master, "revoked");
    let t0 = Instant::now();
    let (status, body) = call(&master, "DELETE", "/api/v1/nodes/hv-r", Some(TOKEN));
    assert_eq!(
        (status, &body["result"]),
        (200, &"revoked".into()),
        "{body}"
    );
    let refused_after = loop {
        let _ = push.send_multipart(node.message_now(heartbeat()), zmq::DONTWAIT);
        if rejected(&master, "revoked") > before
            || metric(
                &master,
                "vmwatch_zmq_connections_closed_total{reason=\"revoked\"}",
            ) >= 1.0
        {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "not refused within 1 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("revoke to first refused message: {refused_after:?}");
    wait_for(
        Duration::from_secs(2),
        "the revoked node's rows gone",
        || (master.node("hv-r").is_none() && master.vms_of("hv-r").ok()?.is_empty()).then_some(()),
    );
    let journal = master.events("node=hv-r").expect("events");
    let vanished = journal.iter().filter(|e| e["event"] == "vanished").count();
    assert_eq!(vanished, 2, "{journal:?}");
    assert!(journal
        .iter()
        .any(|e| e["type"] == "node" && e["event"] == "revoked"));
    // Idempotent; an unknown id is 404; a revoked id cannot be enrolled again.
    let (status, body) = call(&master, "DELETE", "/api/v1/nodes/hv-r", Some(TOKEN));
    assert_eq!((status, &body["result"]), (200, &"already_revoked".into()));
    assert_eq!(
        call(&master, "DELETE", "/api/v1/nodes/nobody", Some(TOKEN)).0,
        404
    );
    assert_eq!(
        call(
            &master,
            "POST",
            "/api/v1/nodes/hv-r/enrollment",
            Some(TOKEN)
        )
        .0,
        409
    );
    // A new connection with the revoked key fails the handshake.
    let again = connect_as(&ctx, &master, "hv-r");
    let mut node2 = SimNode::new("hv-r", now_ms()).expect("node id");
    assert!(!admitted(
        &master,
        &again,
        &mut node2,
        Duration::from_secs(1)
    ));

    // The CLI revokes too, and a running master follows within a second.
    master.enroll("hv-c");
    // The CLI's enrollment reaches ingest within its poll (0.2 s); a refused handshake is
    // final for a libzmq socket.
    std::thread::sleep(Duration::from_millis(400));
    let mut c = SimNode::new("hv-c", now_ms()).expect("node id");
    let push = enrolled_push(&master, &ctx, &mut c);
    let (code, out, err) = master.command(&["revoke", "hv-c"]).expect("revoke");
    assert_eq!(code, 0, "{out}{err}");
    let t0 = Instant::now();
    wait_for(Duration::from_secs(1), "the CLI revocation seen", || {
        let _ = push.send_multipart(c.message_now(heartbeat()), zmq::DONTWAIT);
        master.node("hv-c").is_none().then_some(())
    });
    eprintln!("CLI revoke to rows removed: {:?}", t0.elapsed());
    // Four registry changes later, each enrollment and revocation was journaled once: a
    // registry loaded before the core's own journal commit landed must not repeat one.
    for (node, event) in [
        ("hv-r", "enrolled"),
        ("hv-r", "revoked"),
        ("hv-c", "enrolled"),
        ("hv-c", "revoked"),
    ] {
        let n = master
            .events(&format!("type=node&node={node}"))
            .expect("events")
            .iter()
            .filter(|e| e["event"] == event)
            .count();
        assert_eq!(n, 1, "{node} {event} journaled {n} times");
    }
}

#[test]
fn a_database_from_before_node_keys_migrates_with_its_nodes_enrolled() {
    let _s = serial();
    let dir = temp_dir("migrate6");
    // A round 2 master and node: the fleet key.
    let mut master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let fleet = curve_push(&ctx).expect("fleet push");
    fleet.set_linger(0).expect("linger");
    fleet.connect(&master.endpoint()).expect("connect");
    let mut old = SimNode::new("hv-old", now_ms()).expect("node id");
    assert!(admitted(&master, &fleet, &mut old, Duration::from_secs(5)));
    master.stop().expect("stop");
    drop(fleet);
    // Back to schema 5, as round 2 left it.
    let conn = rusqlite::Connection::open(dir.join("master.db")).expect("open db");
    conn.execute_batch("DROP TABLE enrollment; DROP TABLE settings; PRAGMA user_version = 5;")
        .expect("downgrade");
    drop(conn);
    // The upgrade: no allow_fleet_transport set, so a database with nodes keeps the fleet key.
    std::fs::write(
        &master.config,
        std::fs::read_to_string(&master.config)
            .expect("config")
            .replace("allow_fleet_transport=yes\n", ""),
    )
    .expect("config");
    master.restart().expect("restart");
    let fleet = curve_push(&ctx).expect("fleet push");
    fleet.set_linger(0).expect("linger");
    fleet.connect(&master.endpoint()).expect("connect");
    let mut old = SimNode::new("hv-old", now_ms()).expect("node id");
    assert!(admitted(&master, &fleet, &mut old, Duration::from_secs(5)));
    assert!(master
        .log_text()
        .contains("fleet transport key is still accepted"));
    // hv-old was enrolled by the migration: its own key works with no enrollment step.
    let own = connect_as(&ctx, &master, "hv-old");
    let mut own_node = SimNode::new("hv-old", now_ms() + 1).expect("node id");
    assert!(admitted(
        &master,
        &own,
        &mut own_node,
        Duration::from_secs(5)
    ));
    assert_eq!(metric(&master, "vmwatch_enrolled_nodes"), 1.0);
    // No journal entry claims it was enrolled just now.
    let journal = master.events("node=hv-old&type=node").expect("events");
    assert!(
        !journal.iter().any(|e| e["event"] == "enrolled"),
        "{journal:?}"
    );
}

/// tests/attack/raw_curve.py: a raw CURVE client with node `id`'s enrolled key that sends
/// frames with MORE set and never a last frame for `seconds` (libzmq itself never sends an
/// unfinished message, so the attack needs a client of its own).
fn unfinished_multipart(master: &Master, id: &str, seconds: u32) -> std::process::Child {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/attack/raw_curve.py");
    std::process::Command::new("/usr/bin/python3")
        .args([
            script,
            "127.0.0.1",
            &master.zmq_port.to_string(),
            &vmwatch_tests::sim::master_key(),
            &vmwatch_tests::sim::node_curve_key(id),
            &seconds.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run raw_curve.py")
}

/// What the attacker printed: (frames, bytes, closed by the master).
fn attack_result(child: std::process::Child) -> (u64, u64, bool) {
    let out = child.wait_with_output().expect("raw_curve.py");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("handshake ok"),
        "raw client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = text.lines().last().unwrap_or_default();
    let num = |key: &str| {
        last.split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .or_else(|| {
                last.split(&format!("{key} "))
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let frames = last
        .strip_prefix("sent ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bytes = last
        .split(" frames ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| num("bytes"));
    (frames, bytes, last.ends_with("closed=yes"))
}

#[test]
fn an_unfinished_multipart_message_is_bounded_and_other_nodes_keep_landing() {
    let _s = serial();
    let dir = temp_dir("contain");
    let master = new_install(&dir, &[]);
    let pid = master.pid().expect("pid");
    for id in ["hv-evil", "hv-good"] {
        master.enroll(id);
    }
    let ctx = zmq::Context::new();
    let mut g = SimNode::new("hv-good", now_ms()).expect("node id");
    let good = enrolled_push(&master, &ctx, &mut g);
    let base = rss_kib(pid).expect("rss");
    let bound_kib = (4 * 1024 + 16 * 1024) as u64; // max_message_bytes × 4 + 16 MiB

    // One attacker: its connection is closed, the master stays within the bound.
    let attacker = unfinished_multipart(&master, "hv-evil", 8);
    let mut peak = 0u64;
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(pid).unwrap_or(0).saturating_sub(base));
        // The good node's messages keep landing: each heartbeat's send → visible in the API.
        latencies.push(heartbeat_latency(&master, &good, &mut g));
        std::thread::sleep(Duration::from_millis(10));
    }
    let (frames, bytes, closed) = attack_result(attacker);
    let n = latencies.len();
    let p99 = p99(latencies);
    eprintln!(
        "one attacker: {frames} frames, {bytes} bytes on the wire before the master closed it (closed: {closed}); master RSS growth peak {peak} KiB (bound {bound_kib} KiB); the good node's {n} heartbeats meanwhile: send → API p99 {p99:?}"
    );
    assert!(closed, "the master did not close the attacking connection");
    assert!(
        metric(
            &master,
            "vmwatch_zmq_connections_closed_total{reason=\"unfinished_message\"}"
        ) >= 1.0
    );
    assert!(
        peak <= bound_kib,
        "RSS grew {peak} KiB, over {bound_kib} KiB"
    );
    let log = master.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("node connection closed"))
        .expect("a log line");
    assert!(
        line.contains("hv-evil") && line.contains("127.0.0.1"),
        "{line}"
    );

    // Twenty at once: within the total bound, each closed.
    let base = rss_kib(pid).expect("rss");
    let attackers: Vec<_> = (0..20)
        .map(|_| unfinished_multipart(&master, "hv-evil", 8))
        .collect();
    let mut peak = 0u64;
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        peak = peak.max(rss_kib(pid).unwrap_or(0).saturating_sub(base));
        std::thread::sleep(Duration::from_millis(20));
    }
    let results: Vec<_> = attackers.into_iter().map(attack_result).collect();
    let sent: u64 = results.iter().map(|r| r.1).sum();
    let closed = results.iter().filter(|r| r.2).count();
    eprintln!(
        "twenty attackers: {sent} bytes on the wire, {closed} of 20 closed by the master; master RSS growth peak {peak} KiB (bound {} KiB)",
        256 * 1024
    );
    assert!(
        peak <= 256 * 1024,
        "RSS grew {peak} KiB with twenty attackers"
    );
    assert_eq!(closed, 20);
    assert!(admitted(&master, &good, &mut g, Duration::from_secs(5)));
}

#[test]
fn stats_as_fast_as_admitted_do_not_stall_another_node() {
    let _s = serial();
    let dir = temp_dir("writer");
    let master = new_install(&dir, &[("activity_min_window", "10")]);
    for id in ["hv-fast", "hv-quiet"] {
        master.enroll(id);
    }
    let ctx = zmq::Context::new();
    let mut q = SimNode::new("hv-quiet", now_ms()).expect("node id");
    let quiet = enrolled_push(&master, &ctx, &mut q);
    let measure = |q: &mut SimNode, secs: u64| -> Duration {
        let mut lat = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            lat.push(heartbeat_latency(&master, &quiet, q));
            std::thread::sleep(Duration::from_millis(50));
        }
        p99(lat)
    };
    let quiet_p99 = measure(&mut q, 5);

    // hv-fast: 500 VMs, stats every millisecond (it is refused as too_frequent except one
    // window per second), each window a distinct timestamp.
    let fast = connect_as(&ctx, &master, "hv-fast");
    let mut f = SimNode::new("hv-fast", now_ms()).expect("node id");
    let vms: Vec<String> = (0..500).map(uuid).collect();
    let refs: Vec<&str> = vms.iter().map(String::as_str).collect();
    fast.send_multipart(f.message_now(snapshot(&refs)), 0)
        .expect("snapshot");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let body = Body::Stats(Stats {
                    interval_s: 1,
                    domains: vms
                        .iter()
                        .map(|u| match stats(u, n, 1) {
                            Body::Stats(s) => s.domains[0].clone(),
                            _ => unreachable!("stats() builds stats"),
                        })
                        .collect(),
                });
                let _ = fast.send_multipart(f.message_now(body), 0);
                std::thread::sleep(Duration::from_millis(1));
            }
            n
        })
    };
    let busy_p99 = measure(&mut q, 60);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().expect("flood");
    let too_frequent = rejected(&master, "too_frequent");
    eprintln!(
        "writer: quiet node p99 {quiet_p99:?} alone, {busy_p99:?} beside a node sending {sent} stats windows of 500 VMs in 60 s ({too_frequent} refused as too_frequent)"
    );
    assert!(too_frequent > 0.0);
    assert!(
        busy_p99 <= quiet_p99 * 2 + Duration::from_millis(5),
        "p99 {busy_p99:?} beside the flood vs {quiet_p99:?} alone"
    );
    // At most one activity point per VM per activity_min_window (10 s) over the 60 s.
    let activity = master
        .get(&format!("/api/v1/vms/{}/activity?node=hv-fast", uuid(0)))
        .expect("activity");
    let points = activity["points"].as_array().map_or(0, Vec::len);
    eprintln!("activity points of one VM after 60 s of the flood: {points}");
    assert!(points <= 7, "{points} points: {activity}");
    for p in activity["points"].as_array().into_iter().flatten() {
        assert!(p["window_s"].as_u64().unwrap_or(0) >= 10, "{p}");
    }
}

/// A node started before its enrollment says why it cannot connect, and dials again by itself
/// once enrolled (libvirt's in-process test driver: no daemon needed; issue 24, item 8).
#[test]
fn a_node_refused_says_why_and_connects_once_enrolled() {
    let dir = temp_dir("refused-node");
    let master = new_install(&dir, &[]);
    let lines = format!(
        "connect={}\nnode_id=hv-early\nsecret={}\nmaster_key={}\nnode_key={}\nheartbeat_interval=1\n",
        master.endpoint(),
        node_key("hv-early"),
        vmwatch_tests::sim::master_key(),
        vmwatch_tests::sim::node_curve_key("hv-early"),
    );
    let node = Node::start_enrolled(&dir, "hv-early", &lines, "test:///default").expect("node");
    wait_for(Duration::from_secs(10), "the node's explanation", || {
        node.log_text()
            .lines()
            .find(|l| l.contains("cannot connect to the master") && l.contains("not enrolled"))
            .map(str::to_owned)
    });
    assert!(master.node("hv-early").is_none());
    let t0 = Instant::now();
    master.enroll("hv-early");
    wait_for(Duration::from_secs(15), "the node up once enrolled", || {
        master.node("hv-early").filter(|n| n["up"] == true)
    });
    eprintln!(
        "enrolled node connected {:?} after its enrollment",
        t0.elapsed()
    );
}
