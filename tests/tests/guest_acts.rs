//! Guests that act by themselves (shared/libvirt-testing.md): a real QEMU guest powers itself
//! off (the OS-install flow's signal), resets itself, or panics, with no `virsh` call; the real
//! node reports each, and `/wait` ends on the guest's own power-off.

use std::time::Duration;

use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node, Scratch};
use vmwatch_tests::require_root_env;

struct Setup {
    lv: PrivateLibvirtd,
    master: Master,
    _node: Node,
    /// Outlives the processes writing into it (see `temp_dir`).
    _dir: Scratch,
}

fn setup(name: &str) -> Setup {
    let lv = PrivateLibvirtd::start(name).expect("private libvirtd");
    let dir = temp_dir(name);
    let master = Master::start(&dir, &[]).expect("master");
    let node = Node::start(&dir, name, &master.endpoint(), &lv.uri(), &[]).expect("node");
    wait_for(Duration::from_secs(30), "the node up", || {
        master
            .node(name)
            .filter(|n| n["up"] == true && n["libvirt_up"] == true)
            .map(|_| ())
    });
    Setup {
        lv,
        master,
        _node: node,
        _dir: dir,
    }
}

/// The lifecycle entries of `uuid`: (event, detail, state).
fn lifecycle(master: &Master, uuid: &str) -> Vec<(String, String, String)> {
    master
        .events(&format!("uuid={uuid}&type=lifecycle"))
        .expect("events")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("event"), s("detail"), s("state"))
        })
        .collect()
}

#[test]
fn a_guest_that_powers_itself_off_ends_the_wait() {
    if !require_root_env("a_guest_that_powers_itself_off_ends_the_wait") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        _node,
    } = setup("poweroff");
    let uuid = lv
        .define_guest("installer", GuestKind::PowersOff)
        .expect("define");
    wait_for(Duration::from_secs(5), "the defined guest", || {
        master
            .vm_state(&uuid, "poweroff")
            .filter(|s| s == "shutoff")
    });
    lv.virsh(&["start", "installer"]).expect("start");
    wait_for(Duration::from_secs(5), "the guest running", || {
        master
            .vm_state(&uuid, "poweroff")
            .filter(|s| s == "running")
    });
    // The panel's OS-install flow: wait for the guest to power itself off. Nobody calls virsh.
    let (status, body) = master
        .get_raw(&format!("/api/v1/vms/{uuid}/wait?state=shutoff&timeout=60"))
        .expect("wait");
    assert_eq!(status, 200, "{body}");
    let rows: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(rows["rows"][0]["state"], "shutoff", "{rows}");
    assert_eq!(rows["rows"][0]["reason"], "shutdown", "{rows}");
    let entries = lifecycle(&master, &uuid);
    assert!(
        entries
            .iter()
            .any(|(e, d, s)| e == "stopped" && d == "shutdown" && s == "shutoff"),
        "{entries:?}"
    );
    assert_eq!(lv.domstate("installer").expect("domstate"), "shutoff");
}

#[test]
fn a_guest_that_resets_itself_is_reported_and_stays_running() {
    if !require_root_env("a_guest_that_resets_itself_is_reported_and_stays_running") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        _node,
    } = setup("reboot");
    let uuid = lv
        .start_guest("rebooter", GuestKind::Reboots)
        .expect("start");
    wait_for(Duration::from_secs(20), "the guest's own reboot", || {
        lifecycle(&master, &uuid)
            .into_iter()
            .find(|(e, _, s)| e == "reboot" && s == "running")
    });
    assert_eq!(master.vm_state(&uuid, "reboot").as_deref(), Some("running"));
}

#[test]
fn a_guest_that_panics_reads_crashed() {
    if !require_root_env("a_guest_that_panics_reads_crashed") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        _node,
    } = setup("panic");
    let uuid = lv
        .start_guest("panicker", GuestKind::Panics)
        .expect("start");
    wait_for(Duration::from_secs(20), "the guest's panic", || {
        lifecycle(&master, &uuid)
            .into_iter()
            .find(|(e, d, s)| e == "crashed" && d == "panicked" && s == "crashed")
    });
    assert_eq!(master.vm_state(&uuid, "panic").as_deref(), Some("crashed"));
    let row = master.vm_row(&uuid, "panic").expect("row");
    assert_eq!(row["reason"], "panicked", "{row}");
}

/// The node holds libvirt read-only (issue 24, item 7): every connection of its process to the
/// private libvirtd is a read-only client, as the daemon's admin interface reports it, and
/// events, inventory and stats still arrive.
#[test]
fn the_node_connects_to_libvirt_read_only() {
    if !require_root_env("the_node_connects_to_libvirt_read_only") {
        return;
    }
    let Setup {
        _dir,
        lv,
        master,
        _node,
    } = setup("readonly");
    let pid = _node.pid().expect("node pid");
    let uuid = lv.start_guest("ro-guest", GuestKind::Idle).expect("start");
    wait_for(
        Duration::from_secs(10),
        "the guest running via events",
        || {
            master
                .vm_state(&uuid, "readonly")
                .filter(|s| s == "running")
        },
    );
    let admin = format!(
        "libvirtd:///system?socket={}",
        lv.dir().join("sock").join("libvirt-admin-sock").display()
    );
    let run = |args: &[&str]| -> String {
        let out = std::process::Command::new("virt-admin")
            .args(["-c", &admin])
            .args(args)
            .output()
            .expect("virt-admin");
        assert!(
            out.status.success(),
            "virt-admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let list = run(&["client-list", "libvirtd"]);
    let ids: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .collect();
    let mut node_clients = 0;
    for id in ids {
        let info = run(&["client-info", "libvirtd", &id]);
        let field = |name: &str| {
            info.lines()
                .find(|l| l.trim_start().starts_with(name))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        if field("unix_process_id") == pid.to_string() {
            node_clients += 1;
            assert_eq!(field("readonly"), "yes", "client {id} of the node:\n{info}");
        }
    }
    assert!(
        node_clients >= 1,
        "no client of the node's process found:\n{list}"
    );
    eprintln!("the node holds {node_clients} libvirt connection(s), all read-only");
}
