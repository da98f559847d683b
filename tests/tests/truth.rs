//! Truth when parts fail: unknown rows while a host cannot be seen, real live migrations that
//! are never duplicates, clock-safe admission, a full disk that loses nothing accepted, and a
//! panel that refuses one entry for good. Real master, real nodes, private libvirtds with real
//! QEMU guests (where libvirt matters), a real SQLite file on a real (small) filesystem.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmwatch_common::protocol::{AgentCounters, Body, DomainState, Heartbeat, Snapshot};
use vmwatch_common::time::now_ms;
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node};
use vmwatch_tests::receiver::{assert_signed_and_ordered, PanelReceiver};
use vmwatch_tests::require_root_env;
use vmwatch_tests::sim::{curve_push, SimNode};

fn rows_of(master: &Master, node: &str) -> Vec<Value> {
    master
        .get(&format!("/api/v1/vms?node={node}&limit=1000"))
        .ok()
        .and_then(|v| v["vms"].as_array().cloned())
        .unwrap_or_default()
}

fn all_unknown(master: &Master, node: &str, reason: &str) -> bool {
    let rows = rows_of(master, node);
    !rows.is_empty()
        && rows
            .iter()
            .all(|r| r["state"] == "unknown" && r["unknown_reason"] == reason)
}

fn heartbeat(libvirt: &str) -> Body {
    Body::Heartbeat(Heartbeat {
        libvirt: libvirt.into(),
        domains: 1,
        version: "sim".into(),
        uptime_s: 1,
        agent: AgentCounters::default(),
    })
}

fn snapshot(domains: &[(&str, &str, &str)]) -> Body {
    Body::Snapshot(Snapshot {
        domains: domains
            .iter()
            .map(|(uuid, state, reason)| DomainState {
                uuid: (*uuid).into(),
                name: format!("vm-{uuid}"),
                state: (*state).into(),
                reason: (*reason).into(),
            })
            .collect(),
        hostname: "sim".into(),
        libvirt_version: "9.0.0".into(),
    })
}

use vmwatch_tests::sim::started as event;

fn rejected(master: &Master, reason: &str) -> f64 {
    master
        .metric(&format!(
            "vmwatch_messages_rejected_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(-1.0)
}

fn duplicates_of(master: &Master, uuid: &str) -> usize {
    master
        .events(&format!("uuid={uuid}&type=duplicate"))
        .expect("events")
        .len()
}

#[test]
fn node_sigkill_makes_its_vms_unknown_then_known_again() {
    if !require_root_env("node_sigkill_makes_its_vms_unknown_then_known_again") {
        return;
    }
    let lv = PrivateLibvirtd::start("unknown").expect("libvirtd");
    let running = lv
        .start_guest("unk-running", GuestKind::Idle)
        .expect("guest");
    lv.define_guest("unk-off", GuestKind::Idle).expect("guest");
    let dir = temp_dir("unknown");
    let master = Master::start(&dir, &[("node_timeout", "3")]).expect("master");
    let mut node = Node::start(
        &dir,
        "unk",
        &master.endpoint(),
        &lv.uri(),
        &[("heartbeat_interval", "1")],
    )
    .expect("node");
    master.wait_matches_libvirt(&lv, "unk", Duration::from_secs(30));

    node.kill9();
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(3 + 2),
        "every row unknown (node-down)",
        || all_unknown(&master, "unk", "node-down").then_some(()),
    );
    eprintln!("node SIGKILL → unknown in the API: {:?}", t0.elapsed());
    let row = master.vm_row(&running, "unk").expect("row");
    assert_eq!(row["last_state"], "running");
    assert!(row["unknown_since"].as_u64().is_some());
    let unknown = master.get("/api/v1/vms?state=unknown").expect("filter");
    assert_eq!(unknown["total"], 2);
    let entries = master
        .events(&format!("uuid={running}&type=lifecycle"))
        .expect("events");
    assert_eq!(
        entries.iter().filter(|e| e["event"] == "unknown").count(),
        1,
        "{entries:?}"
    );
    wait_for(Duration::from_secs(5), "the unknown gauge", || {
        (master.metric("vmwatch_vms{state=\"unknown\"}").ok() == Some(2.0)).then_some(())
    });

    node.start_again().expect("node again");
    master.wait_matches_libvirt(&lv, "unk", Duration::from_secs(20));
    let row = master.vm_row(&running, "unk").expect("row");
    assert_eq!(
        (&row["state"], &row["last_state"]),
        (&"running".into(), &Value::Null)
    );
}

#[test]
fn libvirtd_down_longer_than_node_timeout_makes_vms_unknown() {
    if !require_root_env("libvirtd_down_longer_than_node_timeout_makes_vms_unknown") {
        return;
    }
    let mut lv = PrivateLibvirtd::start("lvdown").expect("libvirtd");
    lv.start_guest("lvd-running", GuestKind::Idle)
        .expect("guest");
    let dir = temp_dir("lvdown");
    let master = Master::start(&dir, &[("node_timeout", "3")]).expect("master");
    let _node = Node::start(
        &dir,
        "lvd",
        &master.endpoint(),
        &lv.uri(),
        &[("heartbeat_interval", "1")],
    )
    .expect("node");
    master.wait_matches_libvirt(&lv, "lvd", Duration::from_secs(30));
    lv.kill();
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(3 + 3),
        "every row unknown (libvirt-down)",
        || all_unknown(&master, "lvd", "libvirt-down").then_some(()),
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(3),
        "unknown before node_timeout: {:?}",
        t0.elapsed()
    );
    lv.restart().expect("libvirtd again");
    master.wait_matches_libvirt(&lv, "lvd", Duration::from_secs(40));
}

/// Live-migrates `name` from `src` to `dst` the way shared/libvirt-testing.md describes.
fn migrate(src: &PrivateLibvirtd, dst: &PrivateLibvirtd, name: &str, n: usize) -> Duration {
    let sock = src.dir().join(format!("mig-{n}.sock"));
    let t0 = Instant::now();
    let out = Command::new("virsh")
        .args([
            "-c",
            &src.uri(),
            "migrate",
            "--live",
            "--p2p",
            "--unsafe",
            name,
        ])
        .arg(dst.uri())
        .arg("--migrateuri")
        .arg(format!("unix://{}", sock.display()))
        .output()
        .expect("virsh migrate");
    assert!(
        out.status.success(),
        "migration {n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t0.elapsed()
}

#[test]
fn live_migrations_are_never_duplicates_but_a_second_copy_is() {
    if !require_root_env("live_migrations_are_never_duplicates_but_a_second_copy_is") {
        return;
    }
    let a = PrivateLibvirtd::start("miga").expect("libvirtd a");
    let b = PrivateLibvirtd::start("migb").expect("libvirtd b");
    let dir = temp_dir("migrate");
    let master = Master::start(&dir, &[("duplicate_grace", "1")]).expect("master");
    let _na = Node::start(&dir, "miga", &master.endpoint(), &a.uri(), &[]).expect("node a");
    let _nb = Node::start(&dir, "migb", &master.endpoint(), &b.uri(), &[]).expect("node b");
    let uuid = a.start_guest("mig-vm", GuestKind::Idle).expect("guest");
    wait_for(Duration::from_secs(30), "the guest on a", || {
        (master.vm_state(&uuid, "miga").as_deref() == Some("running")).then_some(())
    });
    let mut took = Vec::new();
    for n in 0..6 {
        let (src, dst, dst_node) = if n % 2 == 0 {
            (&a, &b, "migb")
        } else {
            (&b, &a, "miga")
        };
        took.push(migrate(src, dst, "mig-vm", n));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(master.vm_state(&uuid, dst_node).as_deref() == Some("running")
            && master.matches_libvirt(&a, "miga")
            && master.matches_libvirt(&b, "migb"))
        {
            assert!(
                Instant::now() < deadline,
                "rows did not follow libvirt after migration {n}:\n a: {:?} / {:?}\n b: {:?} / {:?}",
                a.inventory(),
                master.vms_of("miga"),
                b.inventory(),
                master.vms_of("migb"),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!("6 live migrations took {took:?}");
    // Longer than the grace and a second of duplicate checks later: no entry at all.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(3) {
        assert_eq!(duplicates_of(&master, &uuid), 0, "a migration was flagged");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A real second copy: the same uuid with its own disk on b, running beside a's.
    b.define_guest_with_uuid("mig-vm-copy", &uuid, GuestKind::Idle)
        .expect("define the copy");
    b.virsh(&["start", "mig-vm-copy"]).expect("start the copy");
    wait_for(Duration::from_secs(10), "both copies flagged", || {
        (master
            .get("/api/v1/vms?duplicate=true")
            .ok()
            .and_then(|v| v["total"].as_u64())
            == Some(2))
        .then_some(())
    });
    b.virsh(&["destroy", "mig-vm-copy"]).expect("stop the copy");
    wait_for(Duration::from_secs(10), "the flags cleared", || {
        (master
            .get("/api/v1/vms?duplicate=true")
            .ok()
            .and_then(|v| v["total"].as_u64())
            == Some(0))
        .then_some(())
    });
}

#[test]
fn clock_steps_restarts_old_boots_and_backlogs() {
    let dir = temp_dir("clock");
    let master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    push.set_linger(2000).expect("linger");
    push.connect(&master.endpoint()).expect("connect");
    let send = |frames: [Vec<u8>; 4]| push.send_multipart(frames, 0).expect("send");
    let now = now_ms();

    // The agent started while the clock was an hour ahead; NTP has stepped it back since.
    let mut ahead = SimNode::new("clock", now + 3_600_000).expect("node");
    send(ahead.message_now(heartbeat("up")));
    let captured = ahead.message_now(heartbeat("up"));
    send(captured.clone());
    // It restarts with the right clock: an older boot_ts, not locked out.
    let mut right = SimNode::with_boot("clock", "clock-boot-2", now).expect("node");
    send(right.message_now(heartbeat("up")));
    // The captured message of the old boot, replayed: a superseded boot.
    send(captured);
    wait_for(
        Duration::from_secs(10),
        "three heartbeats and one stale boot",
        || {
            (master
                .metric("vmwatch_messages_accepted_total{kind=\"heartbeat\"}")
                .ok()
                == Some(3.0)
                && rejected(&master, "stale_boot") == 1.0)
                .then_some(())
        },
    );
    assert_eq!(master.node("clock").expect("node")["boot"], "clock-boot-2");

    // A backlog queued for ten minutes while the master was away: accepted, in order, with
    // the original event times.
    let mut queued = SimNode::new("backlog", now - 700_000).expect("node");
    for i in 0..20u64 {
        let sent = now - 600_000 + i * 1000;
        send(queued.message(
            sent,
            event(&format!("bl-{i}"), &format!("bl-{i}"), sent - 5),
        ));
    }
    let entries = wait_for(Duration::from_secs(10), "the backlog journaled", || {
        let e = master.events("node=backlog&type=lifecycle").ok()?;
        (e.len() == 20).then_some(e)
    });
    let times: Vec<u64> = entries
        .iter()
        .filter_map(|e| e["event_ts"].as_u64())
        .collect();
    let want: Vec<u64> = (0..20).map(|i| now - 600_000 + i * 1000 - 5).collect();
    assert_eq!(times, want);
    assert_eq!(
        rejected(&master, "clock_skew") + rejected(&master, "too_old"),
        0.0
    );
}

#[test]
fn ha_restart_is_not_a_duplicate_but_the_returning_zombie_is() {
    let dir = temp_dir("ha");
    let master =
        Master::start(&dir, &[("node_timeout", "2"), ("duplicate_grace", "1")]).expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let send = |frames: [Vec<u8>; 4]| push.send_multipart(frames, 0).expect("send");
    let vm = "5e1c0000-0000-4000-8000-00000000beef";
    let mut old = SimNode::new("ha-old", now_ms()).expect("node");
    send(old.message_now(snapshot(&[(vm, "running", "booted")])));
    wait_for(Duration::from_secs(5), "the VM on the old node", || {
        (master.vm_state(vm, "ha-old").as_deref() == Some("running")).then_some(())
    });
    // The old node goes silent: its row turns unknown, and the VM is restarted elsewhere.
    wait_for(Duration::from_secs(6), "the old row unknown", || {
        (master.vm_state(vm, "ha-old").as_deref() == Some("unknown")).then_some(())
    });
    let mut new = SimNode::new("ha-new", now_ms()).expect("node");
    send(new.message_now(snapshot(&[(vm, "running", "booted")])));
    wait_for(Duration::from_secs(5), "the VM on the new node", || {
        (master.vm_state(vm, "ha-new").as_deref() == Some("running")).then_some(())
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(duplicates_of(&master, vm), 0, "the HA restart was flagged");
        send(new.message_now(heartbeat("up")));
        std::thread::sleep(Duration::from_millis(300));
    }
    // The old node returns, still running it: the zombie is a duplicate.
    let mut back = SimNode::with_boot("ha-old", "ha-old-boot-2", now_ms()).expect("node");
    send(back.message_now(snapshot(&[(vm, "running", "booted")])));
    wait_for(Duration::from_secs(10), "the zombie flagged", || {
        let n = master
            .events(&format!("uuid={vm}&type=duplicate"))
            .ok()?
            .iter()
            .filter(|e| e["event"] == "flagged")
            .count();
        send(new.message_now(heartbeat("up")));
        send(back.message_now(heartbeat("up")));
        (n == 2).then_some(())
    });
}

/// A small tmpfs of its own, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount")
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        SmallFs(dir.to_owned())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `path` with a file until the write fails.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

/// One disk-full episode: `total` events (the first 150 make a commit fail, the rest arrive
/// while the master holds that batch), the disk full for `hold`, then freed: every event is
/// journaled, none rejected or lost, and the node's connection stayed up.
fn disk_full_episode(
    name: &str,
    max_message_age: &str,
    node_timeout: &str,
    total: u64,
    hold: Duration,
) {
    let dir = temp_dir(name);
    let fs = SmallFs::mount(&dir.join("db"), "64m");
    let db = fs.0.join("master.db").display().to_string();
    let master = Master::start(
        &dir,
        &[
            ("db_path", &db),
            ("max_message_age", max_message_age),
            ("node_timeout", node_timeout),
            // Up to 30,000 events of distinct VMs from one node.
            ("max_vms_per_node", "100000"),
        ],
    )
    .expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    // Unbounded here: the test thread must not block while the master pushes back.
    push.set_sndhwm(0).expect("sndhwm");
    push.connect(&master.endpoint()).expect("connect");
    let mut node = SimNode::new("full", now_ms()).expect("node");
    push.send_multipart(node.message_now(heartbeat("up")), 0)
        .expect("send");
    wait_for(Duration::from_secs(5), "the node", || master.node("full"));

    let filler = fs.0.join("filler");
    fill(&filler);
    let mut send = |i: u64| {
        let uuid = if i == 0 {
            CRASHED.to_owned()
        } else {
            format!("6b1e0000-0000-4000-8000-{i:012}")
        };
        push.send_multipart(
            node.message_now(event(&uuid, &"n".repeat(200), now_ms())),
            0,
        )
        .expect("send");
    };
    // The first 150 make a commit fail; the rest arrive while the master holds that batch.
    for i in 0..150 {
        send(i);
    }
    wait_for(
        Duration::from_secs(10),
        "/healthz 503 while the disk is full",
        || (master.get_raw("/healthz").ok()?.0 == 503).then_some(()),
    );
    for i in 150..total {
        send(i);
    }
    let full_since = Instant::now();
    wait_for(
        hold + Duration::from_secs(10),
        "the disk full for the hold",
        || {
            assert_eq!(
                master.get_raw("/healthz").ok()?.0,
                503,
                "healthy on a full disk"
            );
            (full_since.elapsed() >= hold).then_some(())
        },
    );
    std::fs::remove_file(&filler).expect("free the disk");
    let t0 = Instant::now();
    // The node keeps beating while the master recovers, so a `down` entry can only come from
    // the outage itself. The accepted counter moves only after a commit.
    let events_accepted = "vmwatch_messages_accepted_total{kind=\"event\"}";
    wait_for(
        Duration::from_secs(60),
        "every accepted event committed",
        || {
            push.send_multipart(node.message_now(heartbeat("up")), 0)
                .expect("send");
            (master.metric(events_accepted).ok()? >= total as f64).then_some(())
        },
    );
    let journaled = master.events("node=full&type=lifecycle").expect("events");
    assert_eq!(
        journaled.len(),
        total as usize,
        "every accepted event journaled"
    );
    // What the master held carries old arrival times; judged by the clock at recovery, the
    // node would be marked down in the very commit that recovers.
    let downs = master.events("node=full&type=node").expect("node entries");
    assert!(
        !downs.iter().any(|e| e["event"] == "down"),
        "the node was marked down by the outage: {downs:?}"
    );
    eprintln!(
        "{name}: recovered {:?} after the disk was freed",
        t0.elapsed()
    );
    assert_eq!(master.get_raw("/healthz").expect("healthz").0, 200);
    assert!(master.vm_row(CRASHED, "full").is_some());
    for reason in ["too_old", "replay"] {
        assert_eq!(rejected(&master, reason), 0.0, "{reason}");
    }
    assert_eq!(
        master.metric("vmwatch_sequence_gaps_total").expect("gaps"),
        0.0
    );
    // The node's connection survived the episode.
    assert_eq!(
        master
            .metric("vmwatch_zmq_connections")
            .expect("connections"),
        1.0
    );
}

/// The event a full disk must not lose.
const CRASHED: &str = "6b1e0000-0000-4000-8000-00000000dead";

#[test]
fn a_full_disk_holds_the_batch_and_loses_nothing_accepted() {
    if !require_root_env("a_full_disk_holds_the_batch_and_loses_nothing_accepted") {
        return;
    }
    // All 300 fit in the master's channel; the disk stays full for longer than
    // max_message_age, and what the master holds must not age.
    // node_timeout is shorter than the hold, too: the held messages' old arrival times must not
    // make the node look silent when writes recover.
    disk_full_episode("diskfull", "2", "3", 300, Duration::from_secs(4));
}

#[test]
fn a_long_push_back_keeps_every_node_connection() {
    if !require_root_env("a_long_push_back_keeps_every_node_connection") {
        return;
    }
    // 30,000 events: more than the master's channel (16,384) and receive queue (1,000) take,
    // so libzmq stops reading the node for longer than a ZMTP heartbeat timeout (30 s after a
    // PING sent every 10 s) would
    // allow. The connection must stay up and nothing may be lost or replayed.
    disk_full_episode("pushback", "3600", "90", 30_000, Duration::from_secs(45));
}

#[test]
fn an_entry_the_panel_refuses_is_dead_lettered_and_the_rest_arrive() {
    let key = b"panel-key-for-dead-letters-0";
    let panel = PanelReceiver::start(0, key).expect("panel");
    panel
        .refuse_names
        .lock()
        .expect("lock")
        .push("refuse-me".into());
    let dir = temp_dir("deadletter");
    let url = panel.url();
    let master = Master::start(
        &dir,
        &[
            ("panel_url", &url),
            ("panel_secret", "panel-key-for-dead-letters-0"),
            // Retrying changes state: it needs api_token even on loopback.
            ("api_token", "dead-letter-token-0123"),
        ],
    )
    .expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let mut node = SimNode::new("dl", now_ms()).expect("node");
    for (i, name) in ["first", "refuse-me", "after-1", "after-2"]
        .iter()
        .enumerate()
    {
        let uuid = format!("7c1e0000-0000-4000-8000-{i:012}");
        push.send_multipart(node.message_now(event(&uuid, name, now_ms())), 0)
            .expect("send");
    }
    let names = |p: &PanelReceiver| -> Vec<String> {
        p.received()
            .iter()
            .filter_map(|d| d.body["name"].as_str().map(str::to_owned))
            .collect()
    };
    wait_for(
        Duration::from_secs(20),
        "the entries after the refused one",
        || {
            let n = names(&panel);
            (n.contains(&"after-2".to_owned())).then_some(())
        },
    );
    let letters = master.get("/api/v1/dead-letters").expect("dead letters");
    let letters = letters["dead_letters"].as_array().expect("list").clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["status"], 413);
    assert_eq!(letters[0]["entry"]["name"], "refuse-me");
    let id = letters[0]["entry"]["id"].as_i64().expect("id");

    panel.refuse_names.lock().expect("lock").clear();
    let r = ureq::post(&master.url(&format!("/api/v1/dead-letters/{id}/retry")))
        .set("Authorization", "Bearer dead-letter-token-0123")
        .call()
        .expect("retry");
    assert_eq!(r.status(), 200);
    wait_for(
        Duration::from_secs(10),
        "the retried entry delivered",
        || {
            names(&panel)
                .contains(&"refuse-me".to_owned())
                .then_some(())
        },
    );
    let missing = ureq::post(&master.url("/api/v1/dead-letters/999999/retry"))
        .set("Authorization", "Bearer dead-letter-token-0123")
        .call();
    assert!(matches!(missing, Err(ureq::Error::Status(404, _))));
    assert_eq!(
        master.get("/api/v1/dead-letters").expect("dead letters")["dead_letters"],
        serde_json::json!([])
    );
}

/// `panel_batch_max`: a backlog arrives as signed JSON arrays of at most that many entries, in
/// journal order; a batch holding an entry the panel refuses for good is split, so only that
/// entry goes to the dead letters and every other one arrives.
#[test]
fn a_batched_backlog_arrives_in_order_and_a_refused_entry_is_split_out() {
    let key = b"panel-key-for-batches-000000";
    let mut panel = PanelReceiver::start(0, key).expect("panel");
    panel
        .refuse_names
        .lock()
        .expect("lock")
        .push("refuse-me".into());
    let url = panel.url();
    panel.stop();
    let dir = temp_dir("batches");
    let master = Master::start(
        &dir,
        &[
            ("panel_url", &url),
            ("panel_secret", "panel-key-for-batches-000000"),
            ("panel_batch_max", "8"),
        ],
    )
    .expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("socket");
    push.connect(&master.endpoint()).expect("connect");
    let mut node = SimNode::new("batch", now_ms()).expect("node");
    let names: Vec<String> = (0..30)
        .map(|i| {
            if i == 13 {
                "refuse-me".into()
            } else {
                format!("e{i}")
            }
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        let uuid = format!("7c1e0000-0000-4000-8000-{i:012}");
        push.send_multipart(node.message_now(event(&uuid, name, now_ms())), 0)
            .expect("send");
    }
    // 30 lifecycle entries and the node's `up`.
    wait_for(Duration::from_secs(20), "the backlog in the outbox", || {
        master
            .metric("vmwatch_outbox_depth")
            .ok()
            .filter(|d| *d >= 31.0)
    });
    panel.restart().expect("panel back");
    wait_for(Duration::from_secs(60), "the last entry delivered", || {
        panel
            .received()
            .iter()
            .any(|d| d.body["name"] == "e29")
            .then_some(())
    });
    let got = panel.received();
    assert!(
        got.iter().all(|d| d.post_size <= 8),
        "a POST above panel_batch_max"
    );
    assert!(
        got.iter().any(|d| d.post_size == 8),
        "the backlog went as full batches: {:?}",
        got.iter().map(|d| d.post_size).collect::<Vec<_>>()
    );
    assert_signed_and_ordered(&got);
    // Names in order of first arrival (a re-delivery repeats earlier ones).
    let mut delivered: Vec<&str> = Vec::new();
    for name in got.iter().filter_map(|d| d.body["name"].as_str()) {
        if !name.is_empty() && !delivered.contains(&name) {
            delivered.push(name);
        }
    }
    let expected: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "refuse-me")
        .collect();
    assert_eq!(delivered, expected);
    let letters = master.get("/api/v1/dead-letters").expect("dead letters");
    let letters = letters["dead_letters"].as_array().expect("list").clone();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["entry"]["name"], "refuse-me");
    assert_eq!(letters[0]["status"], 413);
}
