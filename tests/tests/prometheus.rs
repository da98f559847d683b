//! The shipped alert rules and Grafana dashboard against a real Prometheus (Debian's, on
//! loopback) scraping a real master with a real node and libvirtd. The rules are loaded with
//! their `for:` durations cut to 1 s (everything else as shipped), so an alert fires within
//! seconds of its condition.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, wait_for_every, Master, Node};
use vmwatch_tests::prometheus::{check_rules, require_prometheus, Prometheus};
use vmwatch_tests::require_root_env;

fn shipped(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Waits until `alert` fires; returns how long it took.
fn fires(prom: &Prometheus, alert: &str, labels: &[(&str, &str)], timeout: Duration) -> Duration {
    let t0 = Instant::now();
    wait_for_every(
        Duration::from_millis(200),
        timeout,
        &format!("{alert} firing"),
        || prom.firing(alert, labels).then_some(()),
    );
    t0.elapsed()
}

/// The shipped rules with every `for:` cut to 1 s, written in `dir`.
fn shortened_rules(rules: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(rules).expect("rules");
    let short: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                format!("{}for: 1s", &l[..l.len() - l.trim_start().len()])
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let test_rules = dir.join("vmwatch.rules.yml");
    std::fs::write(&test_rules, short).expect("rules copy");
    check_rules(&test_rules).expect("the shortened rules");
    test_rules
}

/// SPEC §13's alerts: two masters that both lead (two without `ha`), and a group whose only
/// answering master is a standby (the lease held by one that is gone).
#[test]
fn ha_alerts_fire_for_two_leaders_and_for_none() {
    let test = "ha_alerts_fire_for_two_leaders_and_for_none";
    if !require_root_env(test) || !require_prometheus(test) {
        return;
    }
    let rules = shipped("packaging/prometheus/vmwatch.rules.yml");
    let dir = temp_dir("prom-ha");
    let test_rules = shortened_rules(&rules, &dir);
    for d in ["a", "b", "standby"] {
        std::fs::create_dir_all(dir.join(d)).expect("dir");
    }
    let a = Master::start(&dir.join("a"), &[]).expect("master a");
    let b = Master::start(&dir.join("b"), &[]).expect("master b");
    // Two targets in the one job.
    let two = format!("127.0.0.1:{}\", \"127.0.0.1:{}", a.http_port, b.http_port);
    let prom =
        Prometheus::start(&dir.join("prometheus-two"), &two, &test_rules).expect("prometheus");
    let t = fires(
        &prom,
        "VmwatchTwoLeaders",
        &[("severity", "critical")],
        Duration::from_secs(30),
    );
    eprintln!("VmwatchTwoLeaders fired {t:?} after two leading masters were scraped");
    assert!(!prom.firing("VmwatchNoLeader", &[]));
    drop(prom);

    // A group whose lease a master that is gone still holds: the one that answers stands by.
    let cluster = vmwatch_tests::pg::cluster().expect("cluster");
    let url = cluster.create_database("prom_ha").expect("database");
    let db =
        vmwatch_master::store::Database::parse(&url, Some(&cluster.password_file)).expect("url");
    drop(vmwatch_master::store::Store::open(&db).expect("schema"));
    let mut conn = vmwatch_master::store::Conn::open(&db, vmwatch_master::store::Purpose::Migrate)
        .expect("conn");
    conn.batch("INSERT INTO leader_lease VALUES (1, 7, 'gone', 9000000000000)")
        .expect("a held lease");
    let pw = cluster.password_file.display().to_string();
    let standby = Master::start(
        &dir.join("standby"),
        &[
            ("database", &url),
            ("database_password_file", &pw),
            ("ha", "yes"),
            ("ha_name", "here"),
        ],
    )
    .expect("standby");
    let prom = Prometheus::start(
        &dir.join("prometheus-none"),
        &format!("127.0.0.1:{}", standby.http_port),
        &test_rules,
    )
    .expect("prometheus");
    let t = fires(
        &prom,
        "VmwatchNoLeader",
        &[("severity", "critical")],
        Duration::from_secs(30),
    );
    eprintln!("VmwatchNoLeader fired {t:?} after the standby was scraped");
    let epoch = standby.metric("vmwatch_ha_epoch").expect("epoch");
    assert_eq!(epoch, 7.0, "the standby reports the lease's epoch");
}

#[test]
fn alert_rules_fire_and_resolve_and_every_dashboard_query_returns_data() {
    let test = "alert_rules_fire_and_resolve_and_every_dashboard_query_returns_data";
    if !require_root_env(test) || !require_prometheus(test) {
        return;
    }
    let rules = shipped("packaging/prometheus/vmwatch.rules.yml");
    let checked = check_rules(&rules).expect("promtool check rules");
    eprintln!("{}", checked.trim());

    let lv = PrivateLibvirtd::start("prom").expect("libvirtd");
    lv.start_guest("prom-guest", GuestKind::Idle)
        .expect("guest");
    let dir = temp_dir("prom");
    let master = Master::start(&dir, &[("node_timeout", "3")]).expect("master");
    let mut node = Node::start(
        &dir,
        "prom-hv",
        &master.endpoint(),
        &lv.uri(),
        &[("heartbeat_interval", "1"), ("stats_interval", "2")],
    )
    .expect("node");
    master.wait_matches_libvirt(&lv, "prom-hv", Duration::from_secs(30));

    let test_rules = shortened_rules(&rules, &dir);
    let prom = Prometheus::start(
        &dir.join("prometheus"),
        &format!("127.0.0.1:{}", master.http_port),
        &test_rules,
    )
    .expect("prometheus");
    wait_for(
        Duration::from_secs(30),
        "the master scraped with the node up",
        || {
            let up = prom
                .query("vmwatch_node_up{job=\"vmwatch-master\",node=\"prom-hv\"} == 1")
                .ok()?;
            (!up.is_empty()).then_some(())
        },
    );
    assert!(!prom.firing("VmwatchNodeDown", &[]), "nothing is down yet");

    // The node stops: its bye marks it down at once; the alert fires.
    node.stop().expect("stop the node");
    let t = fires(
        &prom,
        "VmwatchNodeDown",
        &[("node", "prom-hv"), ("severity", "critical")],
        Duration::from_secs(30),
    );
    eprintln!("VmwatchNodeDown fired {t:?} after the node stopped");
    let t = fires(&prom, "VmwatchVmsUnknown", &[], Duration::from_secs(30));
    eprintln!("VmwatchVmsUnknown fired {t:?} after that");
    let alert = prom
        .alerts()
        .expect("alerts")
        .into_iter()
        .find(|a| a["labels"]["alertname"] == "VmwatchNodeDown")
        .expect("the alert");
    assert!(
        alert["annotations"]["runbook"]
            .as_str()
            .is_some_and(|r| r.contains("README.md")),
        "{alert}"
    );

    // It comes back: the alert resolves.
    node.start_again().expect("node again");
    let t0 = Instant::now();
    wait_for_every(
        Duration::from_millis(200),
        Duration::from_secs(30),
        "VmwatchNodeDown resolved",
        || (!prom.firing("VmwatchNodeDown", &[])).then_some(()),
    );
    eprintln!(
        "VmwatchNodeDown resolved {:?} after the node started again",
        t0.elapsed()
    );

    // A node signing with a wrong key.
    let _bad = Node::start(
        &dir,
        "prom-bad",
        &master.endpoint(),
        &lv.uri(),
        &[
            ("heartbeat_interval", "1"),
            ("secret", "wrong-secret-for-this-node-01"),
        ],
    )
    .expect("bad node");
    let t = fires(
        &prom,
        "VmwatchBadSignatures",
        &[("severity", "critical")],
        Duration::from_secs(30),
    );
    eprintln!("VmwatchBadSignatures fired {t:?} after the node with a wrong key started");

    // Every query of every panel of the dashboard runs and returns data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(shipped("packaging/grafana/vmwatch-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut queries = 0;
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let result =
                wait_for(
                    Duration::from_secs(20),
                    &format!("data for {expr}"),
                    || match prom.query(expr) {
                        Ok(r) => (!r.is_empty()).then_some(r),
                        Err(e) => panic!("{}: {expr}: {e}", panel["title"]),
                    },
                );
            assert!(!result.is_empty(), "{} / {expr}", panel["title"]);
            queries += 1;
        }
    }
    eprintln!(
        "{queries} dashboard queries of {} panels returned data",
        panels.len()
    );
}
