//! High availability (SPEC §13) against real parts: two real masters on one database of a
//! private PostgreSQL cluster, a real node with real QEMU guests listing both masters (and a
//! dead endpoint first), and a real webhook receiver.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmwatch_master::store::{Conn, Purpose};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::pg;
use vmwatch_tests::product::{free_port, temp_dir, wait_for, Master, Node, Scratch};
use vmwatch_tests::receiver::PanelReceiver;
use vmwatch_tests::require_root_env;

const PANEL_KEY: &[u8] = b"panel-key-for-the-ha-tests-000";

/// Two masters of one group and what they share.
struct Group {
    masters: Vec<Master>,
    url: String,
    password_file: String,
    /// Last: outlives the masters writing into them (see `temp_dir`).
    _dirs: Vec<Scratch>,
}

impl Group {
    fn start(name: &str, cluster: &pg::Cluster, lease: &str, panel: Option<&str>) -> Group {
        let url = cluster.create_database(name).expect("database");
        let password_file = cluster.password_file.display().to_string();
        let mut masters = Vec::new();
        let mut dirs = Vec::new();
        for m in ["m1", "m2"] {
            let dir = temp_dir(&format!("{name}-{m}"));
            let mut extra = vec![
                ("database", url.as_str()),
                ("database_password_file", password_file.as_str()),
                ("ha", "yes"),
                ("ha_name", m),
                ("ha_lease", lease),
            ];
            if let Some(panel) = panel {
                extra.push(("panel_url", panel));
                extra.push(("panel_secret", "panel-key-for-the-ha-tests-000"));
            }
            masters.push(Master::start(&dir, &extra).expect("master"));
            dirs.push(dir);
            // m1 takes the lease first, so the roles are known.
            if m == "m1" {
                wait_for(Duration::from_secs(10), "m1 leading", || {
                    (role(&masters[0]).as_deref() == Some("leader")).then_some(())
                });
            }
        }
        Group {
            masters,
            url,
            password_file,
            _dirs: dirs,
        }
    }

    /// The node's list: a dead endpoint first, then the standby, then the leader.
    fn connect(&self) -> String {
        format!(
            "tcp://127.0.0.1:{},{},{}",
            free_port(),
            self.masters[1].endpoint(),
            self.masters[0].endpoint()
        )
    }

    fn conn(&self) -> Conn {
        let db = vmwatch_master::store::Database::parse(
            &self.url,
            Some(std::path::Path::new(&self.password_file)),
        )
        .expect("url");
        Conn::open(&db, Purpose::Migrate).expect("connect")
    }
}

fn healthz(master: &Master) -> Option<Value> {
    let (_, body) = master.get_raw("/healthz").ok()?;
    serde_json::from_str(&body).ok()
}

fn role(master: &Master) -> Option<String> {
    healthz(master)?["role"].as_str().map(str::to_owned)
}

fn signal(master: &Master, sig: &str) {
    let pid = master.pid().expect("pid");
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// Every journal id, from the database.
fn journal_ids(group: &Group) -> BTreeSet<i64> {
    let mut conn = group.conn();
    conn.query("SELECT id FROM journal", &[])
        .expect("journal")
        .into_iter()
        .map(|mut r| r.int(0).expect("id"))
        .collect()
}

fn p50_max(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() - 1])
}

/// Leader SIGKILL, ten times, alternating: the standby is ingesting a guest's change made right
/// after the kill within ha_lease + 2 s, the inventory equals libvirt 1 s later, no committed
/// entry is lost, and every entry reaches the panel at least once.
#[test]
fn a_killed_leader_is_replaced_within_the_lease_and_nothing_is_lost() {
    if !require_root_env("a_killed_leader_is_replaced_within_the_lease_and_nothing_is_lost") {
        return;
    }
    let cluster = pg::cluster().expect("cluster");
    let panel = PanelReceiver::start(0, PANEL_KEY).expect("panel");
    let mut group = Group::start("ha_kill", cluster, "3", Some(&panel.url()));
    assert_eq!(role(&group.masters[1]).as_deref(), Some("standby"));
    wait_for(
        Duration::from_secs(5),
        "the standby naming the leader",
        || (healthz(&group.masters[1])?["leader"] == "m1").then_some(()),
    );
    let lv = PrivateLibvirtd::start("hakill").expect("libvirtd");
    let dir = temp_dir("ha-kill-node");
    let _node = Node::start(&dir, "hakill", &group.connect(), &lv.uri(), &[]).expect("node");
    let uuid = lv.define_guest("flip", GuestKind::Idle).expect("guest");
    lv.virsh(&["start", "flip"]).expect("start");
    wait_for(
        Duration::from_secs(30),
        "the guest running on the leader",
        || {
            group.masters[0]
                .vm_state(&uuid, "hakill")
                .filter(|s| s == "running")
        },
    );
    // The standby answers from the database, /wait included.
    assert_eq!(
        group.masters[1].vm_state(&uuid, "hakill").as_deref(),
        Some("running")
    );

    // /wait on the standby ends on the leader's commit.
    let waiter = {
        let url = group.masters[1].url(&format!("/api/v1/vms/{uuid}/wait?state=paused&timeout=20"));
        std::thread::spawn(move || {
            let started = Instant::now();
            let body = ureq::get(&url).call().map(|r| r.into_string());
            (started.elapsed(), body)
        })
    };
    wait_for(
        Duration::from_secs(5),
        "the /wait call waiting on the standby",
        || (group.masters[1].metric("vmwatch_api_waiters").ok()? >= 1.0).then_some(()),
    );
    lv.virsh(&["suspend", "flip"]).expect("suspend");
    let (took, body) = waiter.join().expect("waiter");
    let body = body.expect("wait answered 200").expect("body");
    assert!(body.contains("\"reached\":true"), "{body}");
    eprintln!("/wait on the standby answered {took:?} after it was called");
    lv.virsh(&["resume", "flip"]).expect("resume");
    wait_for(Duration::from_secs(10), "running again", || {
        group.masters[0]
            .vm_state(&uuid, "hakill")
            .filter(|s| s == "running")
    });

    let mut times = Vec::new();
    let mut leader = 0;
    for trial in 0..10 {
        let standby = 1 - leader;
        let before = journal_ids(&group);
        group.masters[leader].kill9();
        let killed = Instant::now();
        let (cmd, want) = if trial % 2 == 0 {
            ("suspend", "paused")
        } else {
            ("resume", "running")
        };
        lv.virsh(&[cmd, "flip"]).expect(cmd);
        wait_for(Duration::from_secs(15), "the standby ingesting", || {
            group.masters[standby]
                .vm_state(&uuid, "hakill")
                .filter(|s| s == want)
        });
        let took = killed.elapsed();
        times.push(took);
        eprintln!("trial {trial}: the new leader ingested the change {took:?} after the kill");
        assert!(
            took <= Duration::from_secs(5),
            "failover took {took:?}, more than ha_lease + 2 s"
        );
        assert_eq!(role(&group.masters[standby]).as_deref(), Some("leader"));
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            group.masters[standby].matches_libvirt(&lv, "hakill"),
            "inventory 1 s after the failover: libvirt {:?}, master {:?}",
            lv.inventory(),
            group.masters[standby].vms_of("hakill")
        );
        let after = journal_ids(&group);
        assert!(before.is_subset(&after), "a committed entry was lost");
        // The killed master comes back as a standby.
        group.masters[leader].restart().expect("restart");
        wait_for(Duration::from_secs(10), "the old leader a standby", || {
            (role(&group.masters[leader]).as_deref() == Some("standby")).then_some(())
        });
        leader = standby;
    }
    let (p50, max) = p50_max(times);
    eprintln!("failover (kill → change ingested), ha_lease=3, 10 trials: p50 {p50:?}, max {max:?}");
    let node = group.masters[leader].node("hakill").expect("node row");
    eprintln!(
        "messages lost as sequence gaps over 10 failovers: gaps {}, lost {}",
        node["gaps"], node["lost"]
    );

    // Every journal entry reaches the panel at least once.
    wait_for(Duration::from_secs(30), "the outbox empty", || {
        (group.masters[leader].metric("vmwatch_outbox_depth").ok()? == 0.0).then_some(())
    });
    let delivered: BTreeSet<i64> = panel.received().iter().map(|d| d.event_id).collect();
    let journal = journal_ids(&group);
    let missing: Vec<&i64> = journal.difference(&delivered).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let redelivered = panel.received().len() - delivered.len();
    eprintln!(
        "{} journal entries, all delivered; {redelivered} delivered more than once",
        journal.len()
    );
}

/// Leader SIGSTOP past the lease: the standby takes over; after SIGCONT the old leader
/// commits nothing more (counted by a trigger on its sessions' name), steps down within one
/// renewal, logs it and serves as a standby.
#[test]
fn a_paused_leader_never_writes_again() {
    if !require_root_env("a_paused_leader_never_writes_again") {
        return;
    }
    let cluster = pg::cluster().expect("cluster");
    let group = Group::start("ha_pause", cluster, "3", None);
    // Every write to the journal, the VM rows and the node rows, by session name.
    group
        .conn()
        .batch(
            "CREATE TABLE audit (app TEXT NOT NULL, at TIMESTAMPTZ NOT NULL); \
             CREATE FUNCTION audit_write() RETURNS trigger AS $$ BEGIN \
               INSERT INTO audit VALUES (current_setting('application_name'), clock_timestamp()); \
               RETURN NULL; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER journal_audit AFTER INSERT ON journal FOR EACH ROW EXECUTE FUNCTION audit_write(); \
             CREATE TRIGGER vms_audit AFTER INSERT OR UPDATE OR DELETE ON vms FOR EACH ROW EXECUTE FUNCTION audit_write(); \
             CREATE TRIGGER nodes_audit AFTER INSERT OR UPDATE OR DELETE ON nodes FOR EACH ROW EXECUTE FUNCTION audit_write();",
        )
        .expect("audit trigger");
    let lv = PrivateLibvirtd::start("hapause").expect("libvirtd");
    let dir = temp_dir("ha-pause-node");
    let _node = Node::start(&dir, "hapause", &group.connect(), &lv.uri(), &[]).expect("node");
    let uuid = lv.define_guest("steady", GuestKind::Idle).expect("guest");
    lv.virsh(&["start", "steady"]).expect("start");
    wait_for(Duration::from_secs(30), "the guest running", || {
        group.masters[0]
            .vm_state(&uuid, "hapause")
            .filter(|s| s == "running")
    });
    let writes = |app: &str, since: &str| {
        group
            .conn()
            .query_int(
                "SELECT count(*) FROM audit WHERE app = ?1 AND at > CAST(CAST(?2 AS TEXT) AS TIMESTAMPTZ)",
                &[app.into(), since.into()],
            )
            .expect("audit")
    };
    assert!(
        writes("vmwatch-master m1", "-infinity") > 0,
        "the leader's writes are seen"
    );

    signal(&group.masters[0], "-STOP");
    wait_for(Duration::from_secs(10), "m2 leading", || {
        (role(&group.masters[1]).as_deref() == Some("leader")).then_some(())
    });
    // Changes while the old leader is frozen: the node's heartbeats close its connection to
    // the frozen one within 5 s, and what it queued there is resent as a snapshot.
    lv.virsh(&["suspend", "steady"]).expect("suspend");
    wait_for(
        Duration::from_secs(15),
        "the pause on the new leader",
        || {
            group.masters[1]
                .vm_state(&uuid, "hapause")
                .filter(|s| s == "paused")
        },
    );
    let resumed_at = group
        .conn()
        .query_row("SELECT CAST(clock_timestamp() AS TEXT)", &[])
        .expect("clock")
        .expect("row")
        .text(0)
        .expect("text");
    signal(&group.masters[0], "-CONT");
    let cont = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the old leader stepping down",
        || {
            group.masters[0]
                .log_text()
                .contains("lost the leader lease")
                .then_some(())
        },
    );
    eprintln!("stepped down {:?} after SIGCONT", cont.elapsed());
    assert!(
        cont.elapsed() <= Duration::from_secs(2),
        "not within one renewal"
    );
    wait_for(Duration::from_secs(20), "the old leader a standby", || {
        (role(&group.masters[0]).as_deref() == Some("standby")).then_some(())
    });
    lv.virsh(&["resume", "steady"]).expect("resume");
    group.masters[1].wait_matches_libvirt(&lv, "hapause", Duration::from_secs(10));
    let old = writes("vmwatch-master m1", &resumed_at);
    let new = writes("vmwatch-master m2", &resumed_at);
    eprintln!("writes after SIGCONT: old leader {old}, new leader {new}");
    assert_eq!(old, 0, "the paused leader wrote after it lost the lease");
    assert!(new > 0);
    let log = group.masters[0].log_text();
    assert!(
        log.contains("was taken over") || log.contains("lost the leader lease"),
        "{log}"
    );
}

/// PostgreSQL restarted under load: both masters survive, nothing accepted is lost, and there
/// is exactly one leader afterwards.
#[test]
fn postgres_restarted_under_ha_leaves_one_leader_and_loses_nothing() {
    if !require_root_env("postgres_restarted_under_ha_leaves_one_leader_and_loses_nothing") {
        return;
    }
    let cluster = pg::Cluster::start(&format!("vmwatch-pg-ha-{}", std::process::id()))
        .expect("a cluster of this test's own");
    let group = Group::start("ha_restart", &cluster, "5", None);
    let lv = PrivateLibvirtd::start("harestart").expect("libvirtd");
    let dir = temp_dir("ha-restart-node");
    let _node = Node::start(&dir, "harestart", &group.connect(), &lv.uri(), &[]).expect("node");
    let uuid = lv.define_guest("steady", GuestKind::Idle).expect("guest");
    lv.virsh(&["start", "steady"]).expect("start");
    wait_for(Duration::from_secs(30), "the guest running", || {
        group.masters[0]
            .vm_state(&uuid, "harestart")
            .filter(|s| s == "running")
    });
    let before = journal_ids(&group);
    // Guest changes across the restart.
    cluster.stop().expect("stop");
    lv.virsh(&["suspend", "steady"]).expect("suspend");
    cluster.restart().expect("start");
    lv.virsh(&["resume", "steady"]).expect("resume");
    let leaders = || {
        group
            .masters
            .iter()
            .filter(|m| role(m).as_deref() == Some("leader"))
            .count()
    };
    wait_for(Duration::from_secs(30), "one leader again", || {
        (leaders() == 1
            && group
                .masters
                .iter()
                .all(|m| healthz(m).is_some_and(|h| h["db"] == "ok")))
        .then_some(())
    });
    let leader = group
        .masters
        .iter()
        .position(|m| role(m).as_deref() == Some("leader"))
        .expect("a leader");
    group.masters[leader].wait_matches_libvirt(&lv, "harestart", Duration::from_secs(15));
    let events: Vec<String> = group.masters[leader]
        .events(&format!("uuid={uuid}&type=lifecycle"))
        .expect("events")
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_owned))
        .collect();
    assert!(
        events.ends_with(&["suspended".to_owned(), "resumed".to_owned()]),
        "{events:?}"
    );
    assert!(
        before.is_subset(&journal_ids(&group)),
        "a committed entry was lost"
    );
    for m in &group.masters {
        assert!(m.get_raw("/healthz").is_ok(), "a master died");
    }
    assert_eq!(leaders(), 1);
}
