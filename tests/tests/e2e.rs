//! End-to-end tests: the real `vmwatch-master` and `vmwatch-node` binaries as processes, a
//! private libvirtd with real QEMU guests, a real ZeroMQ socket, a real SQLite file and the
//! real HTTP API. Every wait is a poll with a deadline.

use std::process::Command;
use std::time::{Duration, Instant};

use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node, Scratch};
use vmwatch_tests::receiver::{assert_signed_and_ordered, Delivery, PanelReceiver};
use vmwatch_tests::require_root_env;

fn wait_node_libvirt(master: &Master, node: &str, up: bool, timeout: Duration) {
    wait_for(
        timeout,
        &format!(
            "node {node} with libvirt {}",
            if up { "up" } else { "down" }
        ),
        || {
            master
                .node(node)
                .filter(|n| n["up"] == true && n["libvirt_up"] == up)
                .map(|_| ())
        },
    );
}

struct Setup {
    lv: PrivateLibvirtd,
    master: Master,
    node: Node,
    /// Outlives the processes writing into it (see `temp_dir`).
    _dir: Scratch,
}

fn setup(name: &str, node_extra: &[(&str, &str)]) -> Setup {
    let lv = PrivateLibvirtd::start(name).expect("private libvirtd");
    let dir = temp_dir(name);
    let master = Master::start(&dir, &[]).expect("master");
    let node = Node::start(&dir, name, &master.endpoint(), &lv.uri(), node_extra).expect("node");
    wait_node_libvirt(&master, name, true, Duration::from_secs(30));
    Setup {
        lv,
        master,
        node,
        _dir: dir,
    }
}

#[test]
fn lifecycle_changes_reach_the_api_within_two_seconds() {
    if !require_root_env("lifecycle_changes_reach_the_api_within_two_seconds") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        node,
    } = setup("life", &[]);
    let uuid = lv
        .define_guest("e2e-life", GuestKind::Idle)
        .expect("define");
    let mut seen = Vec::new();
    let mut expect = |what: &str, state: Option<&str>| {
        let t0 = Instant::now();
        wait_for(
            Duration::from_secs(2),
            &format!("{what}: state {state:?} in the API"),
            || (master.vm_state(&uuid, "life").as_deref() == state).then_some(()),
        );
        seen.push((what.to_owned(), t0.elapsed()));
    };
    expect("define", Some("shutoff"));
    lv.virsh(&["start", "e2e-life"]).expect("start");
    expect("start", Some("running"));
    lv.virsh(&["suspend", "e2e-life"]).expect("suspend");
    expect("suspend", Some("paused"));
    lv.virsh(&["resume", "e2e-life"]).expect("resume");
    expect("resume", Some("running"));
    lv.virsh(&["destroy", "e2e-life"]).expect("destroy");
    expect("destroy", Some("shutoff"));
    lv.virsh(&["undefine", "e2e-life"]).expect("undefine");
    expect("undefine", None);
    eprintln!("lifecycle latencies after virsh returned: {seen:?}");

    // The journal holds each event, in order.
    let events: Vec<String> = master
        .events(&format!("uuid={uuid}&type=lifecycle"))
        .expect("events")
        .iter()
        .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    let wanted = [
        "defined",
        "started",
        "suspended",
        "resumed",
        "stopped",
        "undefined",
    ];
    let mut it = events.iter();
    for w in wanted {
        assert!(it.any(|e| e == w), "journal lacks {w} in order: {events:?}");
    }
    drop(node);
}

#[test]
fn libvirtd_killed_and_restarted() {
    if !require_root_env("libvirtd_killed_and_restarted") {
        return;
    }
    let Setup {
        _dir,
        mut lv,
        master,
        node: _node,
    } = setup("lvkill", &[("heartbeat_interval", "2")]);
    lv.start_guest("e2e-kill-run", GuestKind::Idle)
        .expect("start guest");
    lv.define_guest("e2e-kill-off", GuestKind::Idle)
        .expect("define guest");
    master.wait_matches_libvirt(&lv, "lvkill", Duration::from_secs(5));

    lv.kill();
    let t0 = Instant::now();
    wait_node_libvirt(&master, "lvkill", false, Duration::from_secs(10));
    eprintln!("libvirt down visible after {:?}", t0.elapsed());

    lv.restart().expect("restart libvirtd");
    // Backoff is at most 30 s; the first retries come after 0.5, 1, 2, 4 s.
    wait_node_libvirt(&master, "lvkill", true, Duration::from_secs(45));
    master.wait_matches_libvirt(&lv, "lvkill", Duration::from_secs(10));
    assert!(
        lv.inventory()
            .expect("virsh list")
            .iter()
            .any(|(_, n, s)| n == "e2e-kill-run" && s == "running"),
        "guest survived"
    );
    let downs = master.events("type=node").expect("events");
    assert!(
        downs.iter().any(|e| e["event"] == "libvirt-down"),
        "libvirt-down journaled: {downs:?}"
    );
}

#[test]
fn node_restart_resyncs_changes_made_behind_its_back() {
    if !require_root_env("node_restart_resyncs_changes_made_behind_its_back") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        mut node,
    } = setup("resync", &[]);
    let gone = lv
        .define_guest("e2e-gone", GuestKind::Idle)
        .expect("define");
    lv.define_guest("e2e-later", GuestKind::Idle)
        .expect("define");
    master.wait_matches_libvirt(&lv, "resync", Duration::from_secs(5));

    assert_eq!(
        node.stop().expect("stop node"),
        0,
        "node exits 0 on SIGTERM"
    );
    lv.virsh(&["undefine", "e2e-gone"]).expect("undefine");
    lv.define_guest("e2e-new", GuestKind::Idle)
        .expect("define new");
    lv.virsh(&["start", "e2e-later"]).expect("start");
    node.start_again().expect("node again");
    master.wait_matches_libvirt(&lv, "resync", Duration::from_secs(30));
    let vanished = master
        .events(&format!("uuid={gone}&type=vanished"))
        .expect("events");
    assert_eq!(
        vanished.len(),
        1,
        "the undefined guest is journaled as vanished once: {vanished:?}"
    );
}

#[test]
fn master_sigkill_keeps_inventory_and_traffic_resumes() {
    if !require_root_env("master_sigkill_keeps_inventory_and_traffic_resumes") {
        return;
    }
    let Setup {
        _dir,
        lv,
        mut master,
        mut node,
    } = setup("mkill", &[("heartbeat_interval", "1")]);
    let uuid = lv
        .define_guest("e2e-mkill", GuestKind::Idle)
        .expect("define");
    master.wait_matches_libvirt(&lv, "mkill", Duration::from_secs(5));
    let before = master.vms_of("mkill").expect("vms");
    let boot_before = master.node("mkill").expect("node")["boot"].clone();

    master.kill9();
    master.restart().expect("master restart");
    assert_eq!(
        master.vms_of("mkill").expect("vms"),
        before,
        "inventory survived SIGKILL"
    );

    lv.virsh(&["start", "e2e-mkill"]).expect("start");
    wait_for(
        Duration::from_secs(10),
        "the start after the master restart",
        || (master.vm_state(&uuid, "mkill").as_deref() == Some("running")).then_some(()),
    );
    assert!(node.is_running(), "the node was not restarted");
    assert_eq!(
        master.node("mkill").expect("node")["boot"],
        boot_before,
        "same node process"
    );
}

#[test]
fn wrong_secret_is_rejected_counted_and_logged_once_per_interval() {
    // libvirt's in-process test driver is enough: the messages never get past the HMAC.
    let dir = temp_dir("badkey");
    let master = Master::start(&dir, &[]).expect("master");
    let t0 = Instant::now();
    let _node = Node::start(
        &dir,
        "intruder",
        &master.endpoint(),
        "test:///default",
        &[
            ("secret", "not-the-right-secret-at-all"),
            ("heartbeat_interval", "1"),
        ],
    )
    .expect("node");
    let series = "vmwatch_messages_rejected_total{reason=\"bad_signature\"}";
    wait_for(Duration::from_secs(20), "five rejected messages", || {
        master.metric(series).ok().filter(|n| *n >= 5.0)
    });
    let elapsed = t0.elapsed().as_secs();
    assert_eq!(
        master.get("/api/v1/nodes").expect("nodes")["nodes"],
        serde_json::json!([]),
        "nothing stored"
    );
    assert_eq!(master.get("/api/v1/vms").expect("vms")["total"], 0);
    assert_eq!(
        master.get("/api/v1/events").expect("events")["events"],
        serde_json::json!([])
    );
    let lines = master
        .log_text()
        .lines()
        .filter(|l| l.contains("message rejected") && l.contains("bad_signature"))
        .count();
    assert!(lines >= 1, "the rejection is logged");
    assert!(
        lines as u64 <= 1 + elapsed / 10,
        "{lines} log lines in {elapsed} s: not rate-limited"
    );
}

#[test]
fn hostile_input_is_counted_and_survived() {
    // Needs no libvirt: raw ZeroMQ against the real master.
    let dir = temp_dir("hostile");
    let master = Master::start(&dir, &[("max_message_bytes", "65536")]).expect("master");
    let ctx = zmq::Context::new();
    let push = vmwatch_tests::sim::curve_push(&ctx).expect("socket");
    push.set_linger(1000).expect("linger");
    push.connect(&master.endpoint()).expect("connect");
    let send = |frames: Vec<Vec<u8>>| push.send_multipart(frames, 0).expect("send");
    send(vec![b"hello".to_vec()]);
    send(vec![
        b"vmwatch/2".to_vec(),
        b"n".to_vec(),
        b"{}".to_vec(),
        vec![0; 32],
    ]);
    send(vec![
        b"vmwatch/1".to_vec(),
        b"bad id!".to_vec(),
        b"{}".to_vec(),
        vec![0; 32],
    ]);
    send(vec![
        b"vmwatch/1".to_vec(),
        b"node-x".to_vec(),
        b"{}".to_vec(),
        vec![0; 32],
    ]);
    send((0..1000).map(|i| vec![i as u8]).collect());
    // Oversized: libzmq drops the connection; the master must carry on.
    send(vec![
        b"vmwatch/1".to_vec(),
        b"node-x".to_vec(),
        vec![b'x'; 200_000],
        vec![0; 32],
    ]);
    drop(push);
    let push = vmwatch_tests::sim::curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    push.send_multipart(
        vec![
            b"vmwatch/1".to_vec(),
            b"n".to_vec(),
            b"{}".to_vec(),
            vec![0; 31],
        ],
        0,
    )
    .expect("send");
    let m = |r: &str| {
        master
            .metric(&format!(
                "vmwatch_messages_rejected_total{{reason=\"{r}\"}}"
            ))
            .unwrap_or(0.0)
    };
    wait_for(Duration::from_secs(10), "hostile messages counted", || {
        (m("frame_count") >= 2.0
            && m("bad_tag") >= 1.0
            && m("bad_node_id") >= 1.0
            && m("bad_signature") >= 2.0)
            .then_some(())
    });
    assert_eq!(master.get_raw("/healthz").expect("healthz").0, 200);
    assert_eq!(
        master.get("/api/v1/nodes").expect("nodes")["nodes"],
        serde_json::json!([])
    );
}

/// The ```python block of docs/PROTOCOL.md that contains `marker`.
fn doc_python_block(marker: &str) -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
        .expect("read PROTOCOL.md");
    doc.split("```python\n")
        .skip(1)
        .filter_map(|s| s.split("```").next())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no python block with {marker:?} in PROTOCOL.md"))
        .to_owned()
}

#[test]
fn key_derivation_from_protocol_doc_matches_the_vectors() {
    if !vmwatch_tests::product::require_python_module(
        "key_derivation_from_protocol_doc_matches_the_vectors",
        "zmq",
    ) {
        return;
    }
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &doc_python_block("hkdf_sha256")])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "fdc29d0c39405e1c4ef61c97fdf392ab7760f720250ae3188e642c01f76c0a85 \
         }:#qp.zgNNZ(Lqo*bBkQCxlyE3ELw>38Bqsz#XG0 {Tn<<U/}BumA4m}M}m]^=m){)p>.YPNC}7xbQW+6 \
         y4mG2m]HT8AcIRUOzRYJ@D}mIuh5Q^2>q/NEA?Kv \
         y+BN0pOKwLMSwF5Rz%u1s/5#nUX}d:4[ls)SsAYK IA2j=[wm4tf642TI0rv<n)o#)OFugg6{enXnNyTV"
    );
}

#[test]
fn python_client_from_protocol_doc_is_accepted() {
    // The Python node of docs/PROTOCOL.md, run as written (only the endpoint swapped in),
    // against a master whose secret is the document's, so its printed keys are used as is.
    if !vmwatch_tests::product::require_python_module(
        "python_client_from_protocol_doc_is_accepted",
        "zmq",
    ) {
        return;
    }
    let dir = temp_dir("python");
    // Per-node keys only: the fleet key is refused, so the client must use its enrolled key.
    let master = Master::start(
        &dir,
        &[
            ("secret", "correct horse battery staple"),
            ("allow_fleet_transport", "no"),
        ],
    )
    .expect("master");
    let printed = master.enroll("hv-01");
    let code = doc_python_block("push.connect");
    // connect and node_id, then the three keys the doc's client must carry.
    assert_eq!(printed.lines().count(), 5, "{printed}");
    for line in printed.lines().skip(2) {
        let (key, value) = line.split_once('=').expect("KEY=VALUE");
        assert!(
            code.contains(value),
            "the doc's client lacks the printed {key}: {value}"
        );
    }
    let code = code.replace("tcp://127.0.0.1:1515", &master.endpoint());
    let script = dir.join("node.py");
    std::fs::write(&script, code).expect("write script");
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = wait_for(Duration::from_secs(10), "the python node's bye", || {
        master.node("hv-01").filter(|n| n["up"] == false)
    });
    // Its VM was journaled running; after the bye its host cannot be seen: unknown.
    let row = master
        .vm_row("4f8e1c2a-9d3b-4e6f-8a7c-1b2d3e4f5a6b", "hv-01")
        .expect("the python node's VM");
    assert_eq!(
        (&row["state"], &row["last_state"]),
        (&"unknown".into(), &"running".into())
    );
    assert_eq!(node["version"], "py-0.1");
    assert_eq!(
        master
            .metric("vmwatch_messages_accepted_total{kind=\"heartbeat\"}")
            .expect("metric"),
        1.0
    );
}

/// `usage.<resource>.idle` of a row.
fn idle_flag(row: &serde_json::Value, resource: &str) -> bool {
    row["usage"][resource]["idle"] == true
}

fn journal_of(master: &Master, uuid: &str, kind: &str) -> Vec<(String, String)> {
    master
        .events(&format!("uuid={uuid}&type={kind}"))
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_owned(),
                e["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn idle_detection_on_real_guests() {
    if !require_root_env("idle_detection_on_real_guests") {
        return;
    }
    // 3 s windows, 4 quiet windows (12 s) before a flag: longer than iPXE's longest pause
    // between DHCP retries, so the PXE guest cannot flap while it still tries.
    let lv = PrivateLibvirtd::start("idle").expect("libvirtd");
    let idle = lv
        .start_guest("e2e-idle", GuestKind::Idle)
        .expect("idle guest");
    let writer = lv
        .start_guest("e2e-writer", GuestKind::DiskWriter)
        .expect("writer guest");
    let pxe = lv
        .start_guest("e2e-pxe", GuestKind::Pxe)
        .expect("pxe guest");
    let dir = temp_dir("idle");
    let master = Master::start(&dir, &[("idle_windows", "4")]).expect("master");
    let _node = Node::start(
        &dir,
        "idle",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "3")],
    )
    .expect("node");

    let mut pxe_sent = false;
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(90),
        "idle guest idle on both, writer idle.net, PXE idle.net",
        || {
            let row = |u: &str| master.vm_row(u, "idle");
            let (i, w, p) = (row(&idle)?, row(&writer)?, row(&pxe)?);
            pxe_sent |= p["usage"]["net"]["last_delta"]
                .as_u64()
                .is_some_and(|d| d > 0);
            assert!(
                !idle_flag(&w, "disk"),
                "the disk writer was flagged idle.disk: {w}"
            );
            (idle_flag(&i, "net")
                && idle_flag(&i, "disk")
                && idle_flag(&w, "net")
                && idle_flag(&p, "net"))
            .then_some(())
        },
    );
    eprintln!("all idle flags set after {:?}", t0.elapsed());
    assert!(
        pxe_sent,
        "the PXE guest showed tx activity in its first windows"
    );
    let w = master.vm_row(&writer, "idle").expect("writer row");
    assert_eq!(
        (w["usage"]["nics"].as_u64(), w["usage"]["disks"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        w["usage"]["disk"]["last_delta"]
            .as_u64()
            .is_some_and(|d| d > 0),
        "writer writes: {w}"
    );

    // Journaled once each, no flapping.
    assert_eq!(
        journal_of(&master, &pxe, "idle")
            .iter()
            .filter(|(e, _)| e == "net")
            .count(),
        1
    );
    assert!(
        journal_of(&master, &pxe, "active").is_empty(),
        "the PXE guest flapped"
    );
    assert!(journal_of(&master, &writer, "idle")
        .iter()
        .all(|(e, _)| e != "disk"));
    let flagged = master.get("/api/v1/vms?idle=true").expect("idle filter");
    assert_eq!(
        flagged["total"], 3,
        "all three guests have some idle flag: {flagged}"
    );
    // The gauges are recomputed once a second, not on every commit.
    wait_for(Duration::from_secs(5), "the idle gauge at 3", || {
        master
            .metric("vmwatch_vms_idle{resource=\"net\"}")
            .ok()
            .filter(|n| *n == 3.0)
    });
}

/// The background-noise threshold on a real guest: the disk writer's ≈ 1 write/s is ≈ 3 write
/// requests per 3 s window. One master with `idle_wr_reqs_max=10` flags it idle on the disk
/// and journals the window, the delta and the threshold; another, watching the same guest
/// through its own node with `idle_wr_reqs_max=1`, never does. (The tiny guests have no OS to
/// send network noise; the same rule on `tx_pkts` is unit-tested in idle.rs.)
#[test]
fn background_writes_under_the_threshold_are_idle_and_over_it_are_not() {
    if !require_root_env("background_writes_under_the_threshold_are_idle_and_over_it_are_not") {
        return;
    }
    let lv = PrivateLibvirtd::start("noise").expect("libvirtd");
    let writer = lv
        .start_guest("e2e-noise", GuestKind::DiskWriter)
        .expect("writer guest");
    let run = |name: &str, max: &str| {
        let dir = temp_dir(name);
        let master = Master::start(&dir, &[("idle_windows", "3"), ("idle_wr_reqs_max", max)])
            .expect("master");
        let node = Node::start(
            &dir,
            name,
            &master.endpoint(),
            &lv.uri(),
            &[("stats_interval", "3")],
        )
        .expect("node");
        // The guard first: bindings drop in reverse order, so it outlives the processes.
        (dir, master, node)
    };
    let (_d1, under, _n1) = run("noise-under", "10");
    let (_d2, over, _n2) = run("noise-over", "1");
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "idle.disk under a threshold of 10",
        || {
            let row = under.vm_row(&writer, "noise-under")?;
            idle_flag(&row, "disk").then_some(())
        },
    );
    eprintln!("idle.disk under the threshold after {:?}", t0.elapsed());
    let entries = journal_of(&under, &writer, "idle");
    let (_, detail) = entries
        .iter()
        .find(|(e, _)| e == "disk")
        .expect("an idle disk entry");
    // "3 quiet window(s) of 3 s; wr_reqs +N in the last, threshold 10 per window", N > 0.
    assert!(
        detail.starts_with("3 quiet window(s) of 3 s; wr_reqs +"),
        "{detail}"
    );
    assert!(
        detail.ends_with(" in the last, threshold 10 per window"),
        "{detail}"
    );
    assert!(
        !detail.contains("wr_reqs +0 "),
        "the guest writes: {detail}"
    );
    let settings = Command::new(vmwatch_tests::product::bin("vmwatch-master"))
        .args(["--check-config", "--config"])
        .arg(&under.config)
        .output()
        .expect("--check-config");
    assert!(String::from_utf8_lossy(&settings.stdout).contains("idle_wr_reqs_max=10\n"));

    // The other master saw as many windows of the same guest, every one over its threshold.
    wait_for(
        Duration::from_secs(20),
        "windows judged over a threshold of 1",
        || {
            let row = over.vm_row(&writer, "noise-over")?;
            (row["usage"]["disk"]["last_delta"].as_u64()? > 1).then_some(())
        },
    );
    let row = over.vm_row(&writer, "noise-over").expect("row");
    assert!(
        !idle_flag(&row, "disk"),
        "over the threshold yet idle: {row}"
    );
    assert!(journal_of(&over, &writer, "idle")
        .iter()
        .all(|(e, _)| e != "disk"));
}

/// The activity history of a real guest holds exactly the deltas of libvirt's counters: between
/// two samples the API showed, the points add up to the difference of every counter, and once
/// the guest is paused its disk counter in the last sample is libvirt's own.
#[test]
fn the_activity_history_holds_the_deltas_of_libvirts_counters() {
    if !require_root_env("the_activity_history_holds_the_deltas_of_libvirts_counters") {
        return;
    }
    let lv = PrivateLibvirtd::start("activity").expect("libvirtd");
    let uuid = lv
        .start_guest("e2e-activity", GuestKind::DiskWriter)
        .expect("writer guest");
    let dir = temp_dir("activity");
    let master = Master::start(&dir, &[]).expect("master");
    let _node = Node::start(
        &dir,
        "act",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "2")],
    )
    .expect("node");
    let sample = || -> Option<serde_json::Value> {
        let row = master.vm_row(&uuid, "act")?;
        (!row["usage"]["sample"].is_null()).then(|| row["usage"]["sample"].clone())
    };
    let activity = |query: &str| {
        master
            .get(&format!("/api/v1/vms/{uuid}/activity?{query}"))
            .expect("activity")
    };
    wait_for(Duration::from_secs(30), "a first point", || {
        let page = master.get(&format!("/api/v1/vms/{uuid}/activity")).ok()?;
        (!page["points"].as_array()?.is_empty()).then_some(())
    });
    let first = sample().expect("a sample");
    let t1 = first["ts"].as_u64().expect("ts");
    wait_for(Duration::from_secs(30), "three more windows", || {
        (sample()?["ts"].as_u64()? >= t1 + 6_000).then_some(())
    });
    lv.virsh(&["suspend", &uuid]).expect("suspend");
    // Two samples after the pause: the last one reads the frozen counters.
    let paused_at = vmwatch_common::time::now_ms();
    let last = wait_for(
        Duration::from_secs(30),
        "two samples after the pause",
        || {
            let s = sample()?;
            (s["ts"].as_u64()? >= paused_at + 4_000).then_some(s)
        },
    );
    let t2 = last["ts"].as_u64().expect("ts");
    let stats = lv.domstats(&uuid, &["--block"]).expect("domstats");
    assert_eq!(
        Some(last["wr_reqs"].as_u64().expect("wr_reqs").to_string()),
        stats.get("block.0.wr.reqs").cloned(),
        "the last sample is libvirt's counter"
    );

    let page = activity(&format!("from={t1}&to={t2}"));
    assert_eq!(page["windows_per_point"], 1, "{page}");
    assert_eq!(
        page["thresholds"],
        serde_json::json!({"tx_pkts": 0, "wr_reqs": 0})
    );
    let points = page["points"].as_array().expect("points").clone();
    assert!(points.len() >= 4, "{page}");
    let sum = |name: &str| {
        points
            .iter()
            .map(|p| p[name].as_u64().expect(name))
            .sum::<u64>()
    };
    let diff = |name: &str| last[name].as_u64().expect(name) - first[name].as_u64().expect(name);
    for name in ["wr_reqs", "rd_reqs", "tx_pkts", "rx_pkts"] {
        assert_eq!(
            sum(name),
            diff(name),
            "{name}: the points add up to the counters' change"
        );
    }
    let cpu_ms = (last["cpu_time_ns"].as_u64().unwrap() - first["cpu_time_ns"].as_u64().unwrap())
        / 1_000_000;
    let cpu_sum = sum("cpu_ms");
    assert!(
        cpu_sum <= cpu_ms && cpu_sum + points.len() as u64 >= cpu_ms,
        "cpu {cpu_sum} vs {cpu_ms} ms"
    );
    assert!(sum("wr_reqs") > 0, "the guest writes");
    assert!(points
        .iter()
        .all(|p| p["node_id"] == "act" && p["windows"] == 1));
    assert!(points
        .iter()
        .all(|p| (1..=4).contains(&p["window_s"].as_u64().unwrap_or(0))));
    assert_eq!(
        points.last().map(|p| &p["wr_reqs"]),
        Some(&serde_json::json!(0)),
        "paused: no writes"
    );
    assert!(
        points.iter().all(|p| !p["wr_bytes"].is_null()),
        "byte counters too"
    );

    // A long range is merged: at most max_points points, the sums kept.
    let merged = activity(&format!("from={t1}&to={t2}&max_points=2"));
    let merged_points = merged["points"].as_array().expect("points");
    assert!(merged_points.len() <= 2, "{merged}");
    let merged_sum: u64 = merged_points
        .iter()
        .map(|p| p["wr_reqs"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(merged_sum, sum("wr_reqs"));
    let (status, body) = master
        .get_raw(&format!("/api/v1/vms/{uuid}/activity?from=5&to=1"))
        .expect("bad range");
    assert_eq!(status, 400, "{body}");
    let (status, _) = master
        .get_raw("/api/v1/vms/00000000-0000-4000-8000-000000000000/activity")
        .expect("unknown");
    assert_eq!(status, 404);
}

#[test]
fn restart_and_suspend_never_look_idle() {
    if !require_root_env("restart_and_suspend_never_look_idle") {
        return;
    }
    // One quiet window flags: the most sensitive setting, so any false idle would show.
    let lv = PrivateLibvirtd::start("reset").expect("libvirtd");
    let writer = lv
        .start_guest("e2e-reset", GuestKind::DiskWriter)
        .expect("writer guest");
    let dir = temp_dir("reset");
    let master = Master::start(&dir, &[("idle_windows", "1")]).expect("master");
    let _node = Node::start(
        &dir,
        "reset",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "5")],
    )
    .expect("node");
    let sample_ts = |m: &Master| {
        m.vm_row(&writer, "reset")
            .and_then(|r| r["usage"]["sample"]["ts"].as_u64())
    };
    let next_sample = |m: &Master, after: Option<u64>| {
        wait_for(Duration::from_secs(15), "the next stats sample", || {
            sample_ts(m).filter(|t| Some(*t) > after)
        })
    };
    // Two samples with writes in between: a real delta.
    let s1 = next_sample(&master, None);
    let s2 = next_sample(&master, Some(s1));
    let row = master.vm_row(&writer, "reset").expect("row");
    assert!(
        row["usage"]["disk"]["last_delta"]
            .as_u64()
            .is_some_and(|d| d > 0),
        "{row}"
    );

    // Destroy and start between two samples: the counters restart below the last sample.
    lv.virsh(&["destroy", "e2e-reset"]).expect("destroy");
    lv.virsh(&["start", "e2e-reset"]).expect("start");
    let s3 = next_sample(&master, Some(s2));
    let s4 = next_sample(&master, Some(s3));
    let row = master.vm_row(&writer, "reset").expect("row");
    assert!(
        !idle_flag(&row, "disk"),
        "flagged idle.disk after a restart: {row}"
    );

    // Suspended: not evaluated, so no flag and no flapping over several windows.
    lv.virsh(&["suspend", "e2e-reset"]).expect("suspend");
    let mut last = s4;
    for _ in 0..3 {
        last = next_sample(&master, Some(last));
    }
    let row = master.vm_row(&writer, "reset").expect("row");
    assert_eq!(row["state"], "paused");
    assert!(
        !idle_flag(&row, "disk"),
        "a suspended guest was judged: {row}"
    );
    // (It has no network traffic at all, so `idle.net` is right and expected.)
    let disk_flags: Vec<_> = ["idle", "active"]
        .iter()
        .flat_map(|k| journal_of(&master, &writer, k))
        .filter(|(resource, _)| resource == "disk")
        .collect();
    assert!(
        disk_flags.is_empty(),
        "disk flag changes for the writer: {disk_flags:?}"
    );
    assert!(idle_flag(&row, "net"), "no tx at all is idle.net: {row}");
}

const PANEL_KEY: &str = "panel-secret-for-the-tests-0123";

/// The journal ids the master holds, in order.
fn journal_ids(master: &Master) -> Vec<i64> {
    master
        .events("")
        .expect("events")
        .iter()
        .filter_map(|e| e["id"].as_i64())
        .collect()
}

/// Waits until the panel has received every journal entry (by id); returns the deliveries.
fn wait_all_delivered(master: &Master, panel: &PanelReceiver, timeout: Duration) -> Vec<Delivery> {
    let mut last = (Vec::new(), Vec::new());
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let want = journal_ids(master);
        let got = panel.received();
        let mut got_ids: Vec<i64> = got.iter().map(|d| d.event_id).collect();
        got_ids.dedup();
        if !want.is_empty() && want.iter().all(|id| got_ids.contains(id)) {
            return got;
        }
        last = (want, got_ids);
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("not every journal entry reached the panel within {timeout:?}:\n journal: {:?}\n panel:   {:?}", last.0, last.1);
}

#[test]
fn webhook_delivers_every_entry_in_order_through_outages_and_a_crash() {
    if !require_root_env("webhook_delivers_every_entry_in_order_through_outages_and_a_crash") {
        return;
    }
    let lv = PrivateLibvirtd::start("hook").expect("libvirtd");
    let mut panel = PanelReceiver::start(0, PANEL_KEY.as_bytes()).expect("panel");
    let dir = temp_dir("hook");
    let url = panel.url();
    let mut master =
        Master::start(&dir, &[("panel_url", &url), ("panel_secret", PANEL_KEY)]).expect("master");
    let _node = Node::start(&dir, "hook", &master.endpoint(), &lv.uri(), &[]).expect("node");
    wait_node_libvirt(&master, "hook", true, Duration::from_secs(30));

    // Lifecycle of a real guest: each change reaches the panel, signed, in order.
    let uuid = lv
        .define_guest("e2e-hook", GuestKind::Idle)
        .expect("define");
    for cmd in ["start", "suspend", "resume", "destroy"] {
        lv.virsh(&[cmd, "e2e-hook"]).expect(cmd);
    }
    let got = wait_all_delivered(&master, &panel, Duration::from_secs(10));
    assert_signed_and_ordered(&got);
    let events: Vec<&str> = got
        .iter()
        .filter(|d| d.body["uuid"] == uuid.as_str())
        .filter_map(|d| d.body["event"].as_str())
        .collect();
    let mut it = events.iter();
    for e in ["defined", "started", "suspended", "resumed", "stopped"] {
        assert!(
            it.any(|d| *d == e),
            "{e} not delivered in order: {events:?}"
        );
    }

    // The panel is down while guests change; when it returns, everything arrives in order.
    panel.stop();
    lv.virsh(&["start", "e2e-hook"]).expect("start");
    lv.virsh(&["suspend", "e2e-hook"]).expect("suspend");
    wait_for(
        Duration::from_secs(5),
        "failed deliveries while the panel is down",
        || {
            master
                .metric("vmwatch_webhook_failures_total")
                .ok()
                .filter(|n| *n >= 1.0)
        },
    );
    assert!(master.metric("vmwatch_outbox_depth").expect("depth") >= 1.0);
    panel.restart().expect("panel back");
    let got = wait_all_delivered(&master, &panel, Duration::from_secs(30));
    assert_signed_and_ordered(&got);

    // Down again, more changes, the master SIGKILLed with entries pending, restarted.
    panel.stop();
    lv.virsh(&["resume", "e2e-hook"]).expect("resume");
    lv.virsh(&["destroy", "e2e-hook"]).expect("destroy");
    wait_for(Duration::from_secs(5), "the destroy in the journal", || {
        (master.vm_state(&uuid, "hook").as_deref() == Some("shutoff")).then_some(())
    });
    master.kill9();
    master.restart().expect("master restart");
    panel.restart().expect("panel back");
    let got = wait_all_delivered(&master, &panel, Duration::from_secs(30));
    assert_signed_and_ordered(&got);
    let distinct: std::collections::BTreeSet<i64> = got.iter().map(|d| d.event_id).collect();
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        journal_ids(&master),
        "exactly the journal's entries"
    );
    wait_for(Duration::from_secs(10), "an empty outbox", || {
        master
            .metric("vmwatch_outbox_depth")
            .ok()
            .filter(|n| *n == 0.0)
    });
}

#[test]
fn duplicate_vm_on_two_nodes_is_flagged_after_grace_and_cleared() {
    if !require_root_env("duplicate_vm_on_two_nodes_is_flagged_after_grace_and_cleared") {
        return;
    }
    let a = PrivateLibvirtd::start("dupa").expect("libvirtd a");
    let b = PrivateLibvirtd::start("dupb").expect("libvirtd b");
    let dir = temp_dir("dup");
    let master = Master::start(&dir, &[("duplicate_grace", "3")]).expect("master");
    let _na = Node::start(&dir, "dupa", &master.endpoint(), &a.uri(), &[]).expect("node a");
    let _nb = Node::start(&dir, "dupb", &master.endpoint(), &b.uri(), &[]).expect("node b");
    let uuid = vmwatch_tests::guests::random_uuid().expect("uuid");
    a.define_guest_with_uuid("e2e-dup", &uuid, GuestKind::Idle)
        .expect("define a");
    b.define_guest_with_uuid("e2e-dup", &uuid, GuestKind::Idle)
        .expect("define b");
    let dups = |m: &Master| {
        m.get("/api/v1/vms?duplicate=true")
            .ok()
            .and_then(|v| v["total"].as_u64())
    };

    // A short overlap (a migration) is not flagged.
    a.virsh(&["start", "e2e-dup"]).expect("start a");
    b.virsh(&["start", "e2e-dup"]).expect("start b");
    a.virsh(&["destroy", "e2e-dup"]).expect("destroy a");
    wait_for(Duration::from_secs(5), "both rows seen", || {
        (master.vm_state(&uuid, "dupa").as_deref() == Some("shutoff")
            && master.vm_state(&uuid, "dupb").as_deref() == Some("running"))
        .then_some(())
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert_eq!(dups(&master), Some(0), "a short overlap was flagged");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Active on both for longer than the grace: both rows flagged.
    a.virsh(&["start", "e2e-dup"]).expect("start a again");
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(10),
        "both rows flagged duplicate",
        || (dups(&master) == Some(2)).then_some(()),
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "flagged before the grace: {:?}",
        t0.elapsed()
    );
    let flagged = journal_of(&master, &uuid, "duplicate");
    assert_eq!(
        flagged.iter().filter(|(e, _)| e == "flagged").count(),
        2,
        "{flagged:?}"
    );
    wait_for(
        Duration::from_secs(5),
        "the duplicate gauge at 2 (recomputed every second)",
        || {
            master
                .metric("vmwatch_vms_duplicate")
                .ok()
                .filter(|n| *n == 2.0)
        },
    );

    b.virsh(&["destroy", "e2e-dup"]).expect("destroy b");
    wait_for(Duration::from_secs(5), "the flags cleared", || {
        (dups(&master) == Some(0)).then_some(())
    });
    assert_eq!(
        journal_of(&master, &uuid, "duplicate")
            .iter()
            .filter(|(e, _)| e == "cleared")
            .count(),
        2
    );
}

#[test]
fn wait_for_state_releases_promptly_and_times_out_with_408() {
    if !require_root_env("wait_for_state_releases_promptly_and_times_out_with_408") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        node: _node,
    } = setup("wait", &[]);
    let uuid = lv
        .define_guest("e2e-wait", GuestKind::Idle)
        .expect("define");
    wait_for(Duration::from_secs(5), "the guest in the API", || {
        master.vm_state(&uuid, "wait")
    });

    // Already there: answers at once.
    let (status, body) = master
        .get_raw(&format!("/api/v1/vms/{uuid}/wait?state=shutoff&timeout=5"))
        .expect("wait");
    assert_eq!(status, 200, "{body}");

    // Several waiters at once, released by the start.
    let url = master.url(&format!("/api/v1/vms/{uuid}/wait?state=running&timeout=30"));
    let waiters: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = ureq::get(&url).call();
                (r.map(|r| r.status()).unwrap_or(0), Instant::now())
            })
        })
        .collect();
    wait_for(
        Duration::from_secs(5),
        "five requests waiting in the master",
        || {
            master
                .metric("vmwatch_api_waiters")
                .ok()
                .filter(|n| *n == 5.0)
        },
    );
    assert!(
        waiters.iter().all(|w| !w.is_finished()),
        "a waiter answered before the state was reached"
    );
    lv.virsh(&["start", "e2e-wait"]).expect("start");
    let visible = wait_for(Duration::from_secs(5), "running in the API", || {
        (master.vm_state(&uuid, "wait").as_deref() == Some("running")).then(Instant::now)
    });
    for w in waiters {
        let (status, released) = w.join().expect("waiter");
        assert_eq!(status, 200);
        let lag = released.saturating_duration_since(visible);
        assert!(
            lag < Duration::from_secs(1),
            "waiter released {lag:?} after the state was visible"
        );
    }

    // Never reached: 408 with the current row after the timeout.
    let t0 = Instant::now();
    let (status, body) = master
        .get_raw(&format!("/api/v1/vms/{uuid}/wait?state=paused&timeout=1"))
        .expect("wait");
    assert_eq!(status, 408, "{body}");
    assert!(t0.elapsed() >= Duration::from_secs(1));
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["rows"][0]["state"], "running");
    assert_eq!(
        master
            .get_raw(&format!(
                "/api/v1/vms/{uuid}/wait?state=paused&timeout=99999"
            ))
            .expect("wait")
            .0,
        400
    );
    wait_for(Duration::from_secs(5), "no request left waiting", || {
        master
            .metric("vmwatch_api_waiters")
            .ok()
            .filter(|n| *n == 0.0)
    });
}

#[test]
fn log_reopened_on_sighup_loses_no_line() {
    // What logrotate does: rename the file, then send SIGHUP (postrotate); the master must
    // write on into the new file without losing a line. Journal entries are logged one line
    // each at info, so the journal count is the expected line count.
    let dir = temp_dir("logrotate");
    let master = Master::start(&dir, &[("log_level", "info")]).expect("master");
    let ctx = zmq::Context::new();
    let push = vmwatch_tests::sim::curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let mut node =
        vmwatch_tests::sim::SimNode::new("rotator", vmwatch_common::time::now_ms()).expect("node");
    let mut send = |state: &str| {
        let frames = node.message_now(vmwatch_common::protocol::Body::Event(
            vmwatch_common::protocol::DomainEvent {
                uuid: "00000000-0000-4000-8000-000000000001".into(),
                name: "rotated".into(),
                event: "resumed".into(),
                detail: "unpaused".into(),
                state: state.into(),
                reason: "unknown".into(),
                event_ts: vmwatch_common::time::now_ms(),
            },
        ));
        push.send_multipart(frames, 0).expect("send");
    };
    let rotated = dir.join("master.log.1");
    for seq in 1..=400u64 {
        send(if seq % 2 == 0 { "running" } else { "paused" });
        if seq == 200 {
            std::fs::rename(&master.log, &rotated).expect("rename log");
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(master.pid().expect("pid") as i32, libc::SIGHUP) };
        }
        if seq % 50 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_for(Duration::from_secs(10), "all 400 events journaled", || {
        (master
            .events("type=lifecycle")
            .map(|e| e.len())
            .unwrap_or(0)
            == 400)
            .then_some(())
    });
    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" journal "))
            .count()
    };
    let (old, new) = (lines(&rotated), lines(&master.log));
    let total_entries = master.events("").expect("events").len();
    assert!(old > 0 && new > 0, "both files written: {old} + {new}");
    assert_eq!(
        old + new,
        total_entries,
        "every journal line is in one of the two files"
    );
    assert!(
        master.log_text().contains("log file reopened"),
        "the reopen is logged"
    );
}

/// `/metrics` through a real, independent parser, as {"name{label=value,...}": value}.
fn parse_with_prometheus_client(text: &str) -> std::collections::BTreeMap<String, f64> {
    vmwatch_tests::product::parse_openmetrics(text)
        .into_iter()
        .map(|(name, labels, value)| {
            let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (format!("{name}{{{}}}", labels.join(",")), value)
        })
        .collect()
}

#[test]
fn metrics_parse_with_a_real_parser_and_count_a_known_sequence() {
    if !vmwatch_tests::product::require_python_module(
        "metrics_parse_with_a_real_parser_and_count_a_known_sequence",
        "prometheus_client.openmetrics.parser",
    ) {
        return;
    }
    use vmwatch_common::protocol::{
        AgentCounters, Body, DomainEvent, DomainState, Heartbeat, Snapshot,
    };
    let dir = temp_dir("metrics");
    let master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let push = vmwatch_tests::sim::curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let mut node =
        vmwatch_tests::sim::SimNode::new("metered", vmwatch_common::time::now_ms()).expect("node");
    let dom = |u: &str, s: &str| DomainState {
        uuid: u.into(),
        name: format!("vm-{u}"),
        state: s.into(),
        reason: "unknown".into(),
    };
    let event = |u: &str, e: &str, s: &str| {
        Body::Event(DomainEvent {
            uuid: u.into(),
            name: format!("vm-{u}"),
            event: e.into(),
            detail: "x".into(),
            state: s.into(),
            reason: "unknown".into(),
            event_ts: vmwatch_common::time::now_ms(),
        })
    };
    let agent = AgentCounters {
        sent: 41,
        events: 7,
        dropped: 2,
        overflow: 0,
        libvirt_reconnects: 3,
    };
    let heartbeat = Body::Heartbeat(Heartbeat {
        libvirt: "up".into(),
        domains: 3,
        version: "t".into(),
        uptime_s: 5,
        agent,
    });
    let snapshot = Body::Snapshot(Snapshot {
        domains: vec![
            dom("a", "running"),
            dom("b", "running"),
            dom("c", "shutoff"),
        ],
        hostname: "h".into(),
        libvirt_version: "9.0.0".into(),
    });
    let mut messages = vec![
        node.message_now(snapshot),
        node.message_now(event("a", "suspended", "paused")),
    ];
    node.lose(3); // seq jump: 3 lost
    messages.push(node.message_now(event("c", "started", "running")));
    let hb = node.message_now(heartbeat);
    messages.push(hb.clone());
    messages.push(hb); // replay
    messages.push(node.message_with_key(
        vmwatch_common::time::now_ms(),
        event("a", "resumed", "running"),
        b"wrong-secret-0123456789",
    ));
    for m in messages {
        push.send_multipart(m, 0).expect("send");
    }
    let series = wait_for(Duration::from_secs(10), "the sequence counted", || {
        let s = parse_with_prometheus_client(&master.metrics().ok()?);
        (s.get("vmwatch_messages_rejected_total{reason=bad_signature}") == Some(&1.0)
            && s.get("vmwatch_messages_accepted_total{kind=heartbeat}") == Some(&1.0)
            && s.get("vmwatch_nodes_up{}") == Some(&1.0)
            && s.get("vmwatch_vms{state=paused}") == Some(&1.0)
            // The VM gauges are recomputed once a second: wait for the final states too.
            && s.get("vmwatch_vms{state=running}") == Some(&2.0)
            && s.get("vmwatch_journal_size{}") == Some(&8.0)
            // The heartbeat's agent counters reach their gauges on the same 1 s tick, which
            // can come after the tick that showed the final states: wait for their series.
            && s.contains_key("vmwatch_node_agent_events{node=metered}"))
        .then_some(s)
    });
    let expect = [
        ("vmwatch_messages_accepted_total{kind=snapshot}", 1.0),
        ("vmwatch_messages_accepted_total{kind=event}", 2.0),
        ("vmwatch_messages_accepted_total{kind=heartbeat}", 1.0),
        ("vmwatch_messages_rejected_total{reason=replay}", 1.0),
        ("vmwatch_messages_rejected_total{reason=bad_signature}", 1.0),
        ("vmwatch_messages_rejected_total{reason=clock_skew}", 0.0),
        ("vmwatch_sequence_gaps_total{}", 1.0),
        ("vmwatch_messages_lost_total{}", 3.0),
        ("vmwatch_vms{state=running}", 2.0),
        ("vmwatch_vms{state=paused}", 1.0),
        ("vmwatch_nodes_up{}", 1.0),
        ("vmwatch_nodes_down{}", 0.0),
        ("vmwatch_node_up{node=metered}", 1.0),
        ("vmwatch_node_libvirt_up{node=metered}", 1.0),
        ("vmwatch_node_agent_events{node=metered}", 7.0),
        ("vmwatch_node_agent_dropped_messages{node=metered}", 2.0),
        ("vmwatch_node_agent_libvirt_reconnects{node=metered}", 3.0),
        ("vmwatch_vms_duplicate{}", 0.0),
        ("vmwatch_outbox_depth{}", 0.0),
        ("vmwatch_ingest_latency_seconds_count{}", 4.0),
    ];
    let wrong: Vec<String> = expect
        .iter()
        .filter(|(k, v)| series.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v}, got {:?}", series.get(*k)))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Journal: node up, libvirt-up, 3 new domains, 2 events, 1 gap.
    assert_eq!(series.get("vmwatch_journal_size{}"), Some(&8.0));
    assert!(
        series
            .keys()
            .any(|k| k.starts_with("vmwatch_db_commit_seconds_bucket")),
        "commit-time histogram"
    );
}

const VENV_PYTHON: &str = "/opt/vmwatch-test-venv/bin/python";

/// Every endpoint of a real master (with a real node, guest, panel and api_token) answers as
/// `GET /api/v1/openapi.json` says: the document is valid OpenAPI 3.1 (openapi-spec-validator)
/// and every response below, errors included, validates against its documented schema
/// (jsonschema; the hand-written shapes have `additionalProperties: false`).
#[test]
fn every_endpoint_answers_as_its_openapi_document_says() {
    let test = "every_endpoint_answers_as_its_openapi_document_says";
    if !require_root_env(test) {
        return;
    }
    let missing: Vec<String> = (!std::path::Path::new(VENV_PYTHON).exists())
        .then(|| format!("{VENV_PYTHON} with openapi-spec-validator and jsonschema"))
        .into_iter()
        .collect();
    if !vmwatch_tests::ready_or_skip(test, &missing, "run scripts/install-deps.sh as root") {
        return;
    }
    let lv = PrivateLibvirtd::start("openapi").expect("libvirtd");
    let uuid = lv
        .start_guest("openapi-vm", GuestKind::Idle)
        .expect("guest");
    let dir = temp_dir("openapi");
    let token = "openapi-test-token-0123456789";
    let panel = PanelReceiver::start(0, b"panel-key-openapi-0123456789").expect("panel");
    let url = panel.url();
    let master = Master::start(
        &dir,
        &[
            ("api_token", token),
            ("panel_url", &url),
            ("panel_secret", "panel-key-openapi-0123456789"),
        ],
    )
    .expect("master");
    let _node = Node::start(
        &dir,
        "oa",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "2")],
    )
    .expect("node");
    let agent = ureq::AgentBuilder::new().build();
    let call =
        |method: &str, path_and_query: &str, auth: bool| -> (u16, String, serde_json::Value) {
            let mut req = agent.request(method, &master.url(path_and_query));
            if auth {
                req = req.set("Authorization", &format!("Bearer {token}"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {path_and_query}: {e}"),
            };
            let status = resp.status();
            let content_type = resp.content_type().to_owned();
            let text = resp.into_string().expect("body");
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            (status, content_type, body)
        };
    wait_for(Duration::from_secs(30), "an activity point", || {
        let (s, _, b) = call("GET", &format!("/api/v1/vms/{uuid}/activity"), true);
        (s == 200 && !b["points"].as_array()?.is_empty()).then_some(())
    });
    let (status, _, doc) = call("GET", "/api/v1/openapi.json", true);
    assert_eq!(status, 200);
    let unknown = "00000000-0000-4000-8000-000000000000";
    let requests: Vec<(&str, String, &str, bool)> = vec![
        ("get", "/api/v1/vms".into(), "/api/v1/vms", true),
        (
            "get",
            "/api/v1/vms?state=running&limit=5".into(),
            "/api/v1/vms",
            true,
        ),
        ("get", "/api/v1/vms?limit=0".into(), "/api/v1/vms", true),
        ("get", "/api/v1/vms".into(), "/api/v1/vms", false),
        (
            "get",
            format!("/api/v1/vms/{uuid}"),
            "/api/v1/vms/{uuid}",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{unknown}"),
            "/api/v1/vms/{uuid}",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{uuid}/wait?state=running&timeout=1"),
            "/api/v1/vms/{uuid}/wait",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{uuid}/wait?state=shutoff&timeout=1"),
            "/api/v1/vms/{uuid}/wait",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{uuid}/wait?timeout=1"),
            "/api/v1/vms/{uuid}/wait",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{uuid}/activity"),
            "/api/v1/vms/{uuid}/activity",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{uuid}/activity?from=9&to=1"),
            "/api/v1/vms/{uuid}/activity",
            true,
        ),
        (
            "get",
            format!("/api/v1/vms/{unknown}/activity"),
            "/api/v1/vms/{uuid}/activity",
            true,
        ),
        ("get", "/api/v1/nodes".into(), "/api/v1/nodes", true),
        (
            "get",
            "/api/v1/events?limit=3".into(),
            "/api/v1/events",
            true,
        ),
        (
            "get",
            "/api/v1/events?type=nonsense".into(),
            "/api/v1/events",
            true,
        ),
        (
            "get",
            "/api/v1/dead-letters".into(),
            "/api/v1/dead-letters",
            true,
        ),
        (
            "post",
            "/api/v1/dead-letters/999999/retry".into(),
            "/api/v1/dead-letters/{id}/retry",
            true,
        ),
        (
            "post",
            "/api/v1/dead-letters/x/retry".into(),
            "/api/v1/dead-letters/{id}/retry",
            true,
        ),
        (
            "post",
            "/api/v1/nodes/hv-openapi/enrollment".into(),
            "/api/v1/nodes/{node_id}/enrollment",
            true,
        ),
        (
            "post",
            "/api/v1/nodes/bad%20id/enrollment".into(),
            "/api/v1/nodes/{node_id}/enrollment",
            true,
        ),
        (
            "delete",
            "/api/v1/nodes/hv-openapi".into(),
            "/api/v1/nodes/{node_id}",
            true,
        ),
        (
            "delete",
            "/api/v1/nodes/never-enrolled".into(),
            "/api/v1/nodes/{node_id}",
            true,
        ),
        (
            "post",
            "/api/v1/nodes/hv-openapi/enrollment".into(),
            "/api/v1/nodes/{node_id}/enrollment",
            true,
        ),
        (
            "get",
            "/api/v1/openapi.json".into(),
            "/api/v1/openapi.json",
            true,
        ),
        ("get", "/healthz".into(), "/healthz", false),
        ("get", "/metrics".into(), "/metrics", true),
        ("get", "/".into(), "/", false),
    ];
    // Bad parameters on every endpoint that takes a query (or none), and unknown routes.
    let mut requests = requests;
    for (path_and_query, path) in [
        ("/api/v1/vms?bogus=1".to_owned(), "/api/v1/vms"),
        (format!("/api/v1/vms/{uuid}?bogus=1"), "/api/v1/vms/{uuid}"),
        (
            format!("/api/v1/vms/{uuid}/wait?bogus=1"),
            "/api/v1/vms/{uuid}/wait",
        ),
        (
            format!("/api/v1/vms/{uuid}/activity?bogus=1"),
            "/api/v1/vms/{uuid}/activity",
        ),
        ("/api/v1/nodes?bogus=1".to_owned(), "/api/v1/nodes"),
        ("/api/v1/events?bogus=1".to_owned(), "/api/v1/events"),
        (
            "/api/v1/dead-letters?bogus=1".to_owned(),
            "/api/v1/dead-letters",
        ),
    ] {
        requests.push(("get", path_and_query, path, true));
    }
    let mut responses = Vec::new();
    let mut statuses = std::collections::BTreeSet::new();
    for (method, path_and_query, path, auth) in &requests {
        let (status, content_type, body) = call(&method.to_uppercase(), path_and_query, *auth);
        statuses.insert(status);
        let media = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let media = if path == &"/metrics" {
            "application/openmetrics-text; version=1.0.0; charset=utf-8".to_owned()
        } else {
            media
        };
        responses.push(serde_json::json!({
            "method": method, "path": path, "status": status, "body": body, "content_type": media,
        }));
    }
    // Every bad-parameter request above is a 400 whose message names the parameter.
    for (path_and_query, _) in requests
        .iter()
        .filter(|r| r.1.ends_with("bogus=1"))
        .map(|r| (&r.1, r.2))
    {
        let (status, _, body) = call("GET", path_and_query, true);
        assert_eq!(status, 400, "{path_and_query}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains("bogus") && msg.chars().next().is_some_and(|c| !c.is_uppercase()),
            "{path_and_query}: {body}"
        );
    }
    for (method, route) in [
        ("GET", "/api/v1/nope"),
        ("GET", "/nope"),
        ("DELETE", "/api/v1/vms"),
    ] {
        let (status, content_type, body) = call(method, route, true);
        assert!(status == 404 || status == 405, "{method} {route}: {status}");
        responses.push(serde_json::json!({
            "method": method.to_lowercase(), "path": null, "status": status, "body": body,
            "content_type": content_type.split(';').next().unwrap_or_default().trim(),
        }));
    }
    // The webhook bodies the panel received, one by one and as a batch (panel_batch_max > 1).
    let bodies: Vec<serde_json::Value> = panel.received().iter().map(|d| d.body.clone()).collect();
    assert!(bodies.len() >= 2, "the panel received entries");
    for b in bodies.iter().take(3) {
        responses.push(serde_json::json!({"webhook": true, "body": b}));
    }
    responses.push(serde_json::json!({"webhook": true, "body": bodies[..2].to_vec()}));
    assert!(
        [200, 400, 401, 404, 408]
            .iter()
            .all(|s| statuses.contains(s)),
        "every documented status was exercised: {statuses:?}"
    );
    let input = serde_json::json!({"document": doc, "responses": responses});
    let mut child = Command::new(VENV_PYTHON)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/validate.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("validator");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("validator output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "the responses or the document do not validate:\n{report}"
    );
}
