//! The store's semantics on both backends (SPEC §12): every test here runs once on a SQLite
//! file and once on a database of the process's private PostgreSQL cluster. Then what only
//! one side has: `migrate` from a populated SQLite database, TLS with `sslmode=verify-full`,
//! and the schema version guard.

use std::path::PathBuf;

use vmwatch_master::rules::{Effect, Entry, EntryType, Node, Vm};
use vmwatch_master::store::{
    BusCursor, Conn, Database, EventFilter, Outbox, Purpose, Reader, Registry, Store, StoreError,
    Value, VmFilter,
};
use vmwatch_tests::pg;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmwatch-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh database of each backend.
fn backends(name: &str) -> Vec<(&'static str, Database)> {
    let cluster = pg::cluster().expect("the private PostgreSQL cluster");
    let url = cluster.create_database(name).expect("create database");
    vec![
        ("sqlite", Database::Sqlite(temp_dir(name).join("master.db"))),
        (
            "postgres",
            Database::parse(&url, Some(&cluster.password_file)).unwrap(),
        ),
    ]
}

fn vm(node: &str, uuid: &str) -> Vm {
    Vm {
        node_id: node.into(),
        uuid: uuid.into(),
        name: format!("vm-{uuid}").into(),
        state: "running".into(),
        reason: "booted".into(),
        state_since: 5,
        updated_at: 6,
        usage: Default::default(),
        duplicate: false,
        unknown: vmwatch_master::rules::Unknown::boxed(
            Some("running".into()),
            Some(u64::MAX >> 1),
            Some("node-down".into()),
        ),
    }
}

fn entry_at(received_at: u64) -> Entry {
    Entry {
        received_at,
        event_ts: received_at,
        node_id: "hv1".into(),
        uuid: "u1".into(),
        name: "vm1".into(),
        kind: EntryType::Lifecycle,
        event: "started".into(),
        detail: "booted".into(),
        state: "running".into(),
    }
}

#[test]
fn effects_survive_reopen_and_are_readable() {
    for (backend, db) in backends("reopen") {
        let mut dup = vm("hv2", "u2");
        dup.duplicate = true;
        dup.usage.net.idle = true;
        {
            let mut store = Store::open(&db).unwrap();
            let ids = store
                .commit(&[
                    Effect::UpsertVm(vm("hv1", "u1")),
                    Effect::UpsertVm(dup.clone()),
                    Effect::Journal(entry_at(1)),
                    Effect::Journal(entry_at(2)),
                ])
                .unwrap();
            assert_eq!(ids, [1, 2], "{backend}");
        }
        let mut store = Store::open(&db).unwrap();
        let inv = store.load_inventory().unwrap();
        assert_eq!(
            inv.vms["hv1"].get("u1"),
            Some(&vm("hv1", "u1")),
            "{backend}"
        );
        assert_eq!(inv.vms["hv2"].get("u2"), Some(&dup), "{backend}");
        let mut reader = Reader::open(&db).unwrap();
        assert_eq!(reader.vm("u1").unwrap(), vec![vm("hv1", "u1")], "{backend}");
        let f = EventFilter {
            after: 1,
            limit: 10,
            ..Default::default()
        };
        let ids: Vec<i64> = reader.events(&f).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(ids, [2], "{backend}");
        let count = |r: &mut Reader, f: VmFilter| r.vms(&VmFilter { limit: 10, ..f }).unwrap().1;
        assert_eq!(count(&mut reader, VmFilter::default()), 2, "{backend}");
        let shutoff = VmFilter {
            state: Some("shutoff".into()),
            ..Default::default()
        };
        assert_eq!(count(&mut reader, shutoff), 0, "{backend}");
        let flagged = VmFilter {
            idle: true,
            duplicate: true,
            ..Default::default()
        };
        assert_eq!(count(&mut reader, flagged), 1, "{backend}");
        let on_hv1 = VmFilter {
            node: Some("hv1".into()),
            ..Default::default()
        };
        assert_eq!(count(&mut reader, on_hv1), 1, "{backend}");
        store
            .commit(&[Effect::RemoveVm {
                node_id: "hv1".into(),
                uuid: "u1".into(),
            }])
            .unwrap();
        assert!(reader.vm("u1").unwrap().is_empty(), "{backend}");
    }
}

#[test]
fn retention_purges_old_delivered_entries_only() {
    for (backend, db) in backends("retention") {
        let mut store = Store::open(&db).unwrap();
        const DAY: u64 = 86_400_000;
        let now = 400 * DAY;
        store
            .commit(&[
                Effect::Journal(entry_at(now - 100 * DAY)),
                Effect::Journal(entry_at(now - 10 * DAY)),
            ])
            .unwrap();
        store.enable_outbox();
        let pending = store
            .commit(&[Effect::Journal(entry_at(now - 100 * DAY))])
            .unwrap();
        let cutoff = vmwatch_master::retention::cutoff(now, 90).unwrap();
        assert_eq!(store.purge_journal(cutoff).unwrap(), 1, "{backend}");
        let mut reader = Reader::open(&db).unwrap();
        let ids: Vec<i64> = reader
            .events(&EventFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(
            ids,
            [2, pending[0]],
            "{backend}: the 10-day-old and the undelivered stay"
        );
    }
}

#[test]
fn outbox_dead_letters_and_retry() {
    for (backend, db) in backends("outbox") {
        let mut store = Store::open(&db).unwrap();
        store.enable_outbox();
        let ids = store
            .commit(&[
                Effect::Journal(entry_at(1)),
                Effect::Journal(entry_at(2)),
                Effect::Journal(entry_at(3)),
            ])
            .unwrap();
        let mut outbox = Outbox::open(&db).unwrap();
        let pending: Vec<i64> = outbox.pending(10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(pending, ids, "{backend}");
        outbox.ack(&ids[..1]).unwrap();
        outbox.dead_letter(ids[1], 410, 3, 99).unwrap();
        outbox.dead_letter(ids[1], 410, 4, 100).unwrap();
        assert_eq!(outbox.depth().unwrap(), 1, "{backend}");
        assert_eq!(outbox.dead_letter_count().unwrap(), 1, "{backend}");
        let mut reader = Reader::open(&db).unwrap();
        let dead = reader.dead_letters(10).unwrap();
        assert_eq!(
            (
                dead[0].status,
                dead[0].attempts,
                dead[0].dead_at,
                dead[0].entry.id
            ),
            (410, 4, 100, ids[1]),
            "{backend}"
        );
        assert!(outbox.retry_dead_letter(ids[1]).unwrap(), "{backend}");
        assert!(!outbox.retry_dead_letter(ids[1]).unwrap(), "{backend}");
        let pending: Vec<i64> = outbox.pending(10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(pending, ids[1..], "{backend}: back at its place");
    }
}

/// Points are appended to their VM's, node's and day's row, read back in order across days
/// and nodes, and whole days go at retention.
#[test]
fn activity_is_appended_per_day_and_purged_by_day() {
    use vmwatch_master::activity::{Point, DAY_MS};
    for (backend, db) in backends("activity") {
        let mut store = Store::open(&db).unwrap();
        let at = |ts: u64, tx: u64| Point {
            ts,
            window_ms: 600_000,
            deltas: [
                Some(tx),
                Some(1),
                None,
                Some(3),
                Some(4),
                Some(5),
                Some(6),
                Some(7),
                Some(8),
            ],
            idle_net: tx == 0,
            idle_disk: false,
        };
        let point = |node: &str, p: Point| Effect::Activity {
            node_id: node.into(),
            uuid: "u1".into(),
            point: p,
        };
        let day = 20_000 * DAY_MS;
        store
            .commit(&[
                point("hv1", at(day - 600_000, 9)),
                point("hv1", at(day + 600_000, 0)),
                point("hv1", at(day + 1_200_000, 2)),
                point("hv2", at(day + 600_000, 1)),
            ])
            .unwrap();
        let mut reader = Reader::open(&db).unwrap();
        let all = reader.activity("u1", None, 19_999, 20_000).unwrap();
        let shape: Vec<(String, usize)> = all.iter().map(|(n, p)| (n.clone(), p.len())).collect();
        assert_eq!(
            shape,
            [("hv1".into(), 1), ("hv1".into(), 2), ("hv2".into(), 1)],
            "{backend}"
        );
        assert_eq!(
            all[1].1,
            [at(day + 600_000, 0), at(day + 1_200_000, 2)],
            "{backend}"
        );
        assert_eq!(
            reader.activity("u1", Some("hv2"), 0, 30_000).unwrap().len(),
            1,
            "{backend}"
        );
        assert_eq!(
            store.purge_activity(20_000).unwrap(),
            1,
            "{backend}: the day before"
        );
        assert_eq!(
            reader.activity("u1", None, 0, 30_000).unwrap().len(),
            2,
            "{backend}"
        );
    }
}

/// With the bus on, an old entry the broker has not confirmed stays; once the cursor passes
/// it, it goes. The cursor starts at the journal's end and never moves back.
#[test]
fn retention_keeps_what_the_bus_has_not_confirmed() {
    for (backend, db) in backends("retention_bus") {
        let mut store = Store::open(&db).unwrap();
        const DAY: u64 = 86_400_000;
        let now = 400 * DAY;
        let before = store
            .commit(&[Effect::Journal(entry_at(now - 100 * DAY))])
            .unwrap();
        store.enable_bus().unwrap();
        store.enable_bus().unwrap();
        let mut cursor = BusCursor::open(&db).unwrap();
        assert_eq!(
            cursor.position().unwrap(),
            before[0],
            "{backend}: starts at the end"
        );
        let old = store
            .commit(&[
                Effect::Journal(entry_at(now - 100 * DAY)),
                Effect::Journal(entry_at(now - 100 * DAY)),
            ])
            .unwrap();
        assert_eq!(cursor.after(before[0], 10).unwrap().len(), 2, "{backend}");
        let cutoff = vmwatch_master::retention::cutoff(now, 90).unwrap();
        assert_eq!(
            store.purge_journal(cutoff).unwrap(),
            1,
            "{backend}: only the one before the bus"
        );
        cursor.advance(old[0]).unwrap();
        cursor.advance(before[0]).unwrap();
        assert_eq!(
            cursor.position().unwrap(),
            old[0],
            "{backend}: never moves back"
        );
        assert_eq!(store.purge_journal(cutoff).unwrap(), 1, "{backend}");
        let left: Vec<i64> = cursor.after(0, 10).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(left, [old[1]], "{backend}: the unconfirmed entry stays");
        assert_eq!(cursor.journal_end().unwrap(), old[1], "{backend}");
    }
}

#[test]
fn registry_enrolls_revokes_and_bumps_its_version() {
    use vmwatch_master::store::{Enrolled, Revoked};
    for (backend, db) in backends("registry") {
        drop(Store::open(&db).unwrap());
        let mut reg = Registry::open(&db).unwrap();
        let v0 = reg.version().unwrap();
        assert!(
            !reg.fleet_transport().unwrap(),
            "{backend}: a new database refuses the fleet key"
        );
        assert_eq!(
            reg.enroll("hv1", "", 10).unwrap(),
            Enrolled::New,
            "{backend}"
        );
        assert_eq!(
            reg.enroll("hv1", "KEY", 11).unwrap(),
            Enrolled::Already,
            "{backend}"
        );
        assert_eq!(reg.version().unwrap(), v0 + 1, "{backend}");
        assert_eq!(reg.revoke("hv1", 12).unwrap(), Revoked::Now, "{backend}");
        assert_eq!(
            reg.revoke("hv1", 13).unwrap(),
            Revoked::Already,
            "{backend}"
        );
        assert_eq!(
            reg.revoke("hv9", 13).unwrap(),
            Revoked::NotEnrolled,
            "{backend}"
        );
        assert_eq!(
            reg.enroll("hv1", "KEY", 14).unwrap(),
            Enrolled::Revoked,
            "{backend}"
        );
        let all = reg.all().unwrap();
        assert_eq!(
            (
                all[0].public_key.as_str(),
                all[0].enrolled_at,
                all[0].revoked_at
            ),
            ("KEY", 10, Some(12)),
            "{backend}"
        );
        assert_eq!(reg.version().unwrap(), v0 + 2, "{backend}");
    }
}

#[test]
fn a_newer_schema_is_refused() {
    for (backend, db) in backends("newer") {
        let mut store = Store::open(&db).unwrap();
        let bump = match store.conn() {
            Conn::Sqlite(_) => "PRAGMA user_version = 99",
            Conn::Postgres(_) => "UPDATE settings SET value = 99 WHERE key = 'schema_version'",
        };
        store.conn().batch(bump).unwrap();
        drop(store);
        let err = Store::open(&db).err().expect("refused");
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{backend}: {err}"
        );
    }
}

fn node(node_id: &str, last_seen: u64) -> Node {
    Node {
        node_id: node_id.into(),
        up: true,
        libvirt_up: true,
        first_seen: 1,
        last_seen,
        boot: "boot-1".into(),
        boot_ts: 1,
        last_seq: last_seen,
        version: "0.1.0".into(),
        hostname: format!("{node_id}.example").into(),
        libvirt_version: "9.0.0".into(),
        domains: 3,
        gaps: 0,
        lost: 0,
        libvirt_down_since: 0,
        superseded: vec![("boot-0".into(), 1)],
    }
}

/// One commit of thousands of row writes (PostgreSQL sends them a thousand to a statement),
/// with rows written twice, removed and written again in between, ends the same on both
/// backends: each row's writes in their order, every journal entry in the outbox in order.
#[test]
fn a_large_commit_keeps_each_rows_order() {
    let mut inventories = Vec::new();
    for (backend, db) in backends("large-commit") {
        let mut store = Store::open(&db).unwrap();
        store.enable_outbox();
        let point = |i: u64| vmwatch_master::activity::Point {
            ts: 20_000 * vmwatch_master::activity::DAY_MS + i * 1000,
            window_ms: 600_000,
            deltas: [Some(i); 9],
            idle_net: false,
            idle_disk: i.is_multiple_of(2),
        };
        let mut effects = Vec::new();
        for i in 0..2500u64 {
            effects.push(Effect::UpsertVm(vm(
                &format!("hv{}", i % 3),
                &format!("u{i}"),
            )));
            if i % 2 == 0 {
                effects.push(Effect::Journal(entry_at(i)));
            }
            if i % 500 == 0 {
                effects.push(Effect::UpsertNode(node(&format!("hv{}", i % 3), i)));
            }
            if i < 1200 {
                effects.push(Effect::Activity {
                    node_id: format!("hv{}", i % 3),
                    uuid: format!("u{i}"),
                    point: point(i),
                });
            }
        }
        // u7 written again, later: the second write wins. A known row (no unknown fields: NULLs
        // in the arrays) among unknown ones.
        let mut paused = vm("hv1", "u7");
        paused.state = "paused".into();
        paused.unknown = None;
        effects.push(Effect::UpsertVm(paused));
        // u8 (sent with the first thousand) removed, then written again: it exists, as
        // written last.
        effects.push(Effect::RemoveVm {
            node_id: "hv2".into(),
            uuid: "u8".into(),
        });
        let mut back = vm("hv2", "u8");
        back.name = "back".into();
        effects.push(Effect::UpsertVm(back));
        // u10 written again, then removed: gone.
        effects.push(Effect::UpsertVm(vm("hv1", "u10")));
        effects.push(Effect::RemoveVm {
            node_id: "hv1".into(),
            uuid: "u10".into(),
        });
        // A node removed, then written again (its last_seen 9999).
        effects.push(Effect::RemoveNode {
            node_id: "hv0".into(),
        });
        effects.push(Effect::UpsertNode(node("hv0", 9999)));
        effects.push(Effect::UpsertNode(node("hv1", 7777)));
        let ids = store.commit(&effects).unwrap();
        assert_eq!(ids, (1..=1250).collect::<Vec<i64>>(), "{backend}");
        let inv = store.load_inventory().unwrap();
        assert_eq!(inv.vm_count(), 2499, "{backend}");
        let u7 = inv.vms["hv1"].get("u7").unwrap();
        assert_eq!(
            (u7.state.as_str(), u7.last_state(), u7.unknown_since()),
            ("paused", None, None),
            "{backend}"
        );
        assert_eq!(inv.vms["hv2"].get("u8").unwrap().name, "back", "{backend}");
        assert!(inv.vms["hv1"].get("u10").is_none(), "{backend}");
        assert_eq!(
            inv.vms["hv0"].get("u2499"),
            Some(&vm("hv0", "u2499")),
            "{backend}"
        );
        assert_eq!(
            inv.vms["hv1"].get("u2497"),
            Some(&vm("hv1", "u2497")),
            "{backend}"
        );
        assert_eq!(inv.nodes["hv0"], node("hv0", 9999), "{backend}");
        assert_eq!(inv.nodes["hv1"], node("hv1", 7777), "{backend}");
        assert_eq!(inv.nodes["hv2"], node("hv2", 2000), "{backend}");
        // Each id is its entry's: entry k was received at 2k.
        let mut reader = Reader::open(&db).unwrap();
        let f = EventFilter {
            after: 1100,
            limit: 1000,
            ..Default::default()
        };
        let journal: Vec<(i64, u64)> = reader
            .events(&f)
            .unwrap()
            .iter()
            .map(|e| (e.id, e.received_at))
            .collect();
        let want: Vec<(i64, u64)> = (1101..=1250).map(|id| (id, 2 * (id as u64 - 1))).collect();
        assert_eq!(journal, want, "{backend}");
        // Activity points, more than one statement takes.
        for i in [0u64, 999, 1000, 1199] {
            let got = reader.activity(&format!("u{i}"), None, 0, 30_000).unwrap();
            let want = vec![(format!("hv{}", i % 3), vec![point(i)])];
            assert_eq!(got, want, "{backend}: u{i}'s activity");
        }
        assert!(reader
            .activity("u1200", None, 0, 30_000)
            .unwrap()
            .is_empty());
        let mut outbox = Outbox::open(&db).unwrap();
        assert_eq!(outbox.depth().unwrap(), 1250, "{backend}");
        let pending: Vec<i64> = outbox.pending(100).unwrap().iter().map(|e| e.id).collect();
        assert_eq!(pending, ids[..100], "{backend}");
        let mut vms: Vec<Vm> = inv
            .vms
            .values()
            .flat_map(|rows| rows.values().cloned())
            .collect();
        vms.sort_by(|a, b| a.uuid.cmp(&b.uuid));
        let mut nodes: Vec<Node> = inv.nodes.into_values().collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        inventories.push((vms, nodes));
    }
    assert!(inventories[0] == inventories[1], "the two backends differ");
}

/// An array argument where a statement takes one value is an error naming what was given, not
/// a panic (postgres-types' slice impl panics on a type that is not an array); SQLite refuses
/// arrays altogether.
#[test]
fn a_list_where_one_value_is_taken_is_an_error() {
    for (backend, db) in backends("list-argument") {
        let mut conn = Conn::open(&db, Purpose::Writer).unwrap();
        let items = [Value::Int(1), Value::Int(2)];
        let err = conn
            .query("SELECT ?1 + 1", &[Value::List(&items)])
            .expect_err("refused")
            .to_string();
        let want = match backend {
            "sqlite" => "SQLite has no array parameters",
            _ => "a list given for a parameter of type int4",
        };
        assert!(err.contains(want), "{backend}: {err}");
        // The connection is still usable.
        assert_eq!(
            conn.query_int("SELECT 41 + 1", &[]).unwrap(),
            42,
            "{backend}"
        );
    }
}

/// `migrate` copies every table of a populated SQLite database into PostgreSQL: the readers
/// answer the same on both, ids continue after the source's, and a second run is refused.
#[test]
fn migrate_moves_a_populated_sqlite_database_whole() {
    use vmwatch_master::activity::Point;
    let [(_, sqlite), (_, postgres)] = <[_; 2]>::try_from(backends("migrate")).ok().unwrap();
    let mut store = Store::open(&sqlite).unwrap();
    store.enable_outbox();
    store.enable_bus().unwrap();
    let point = Point {
        ts: 1_700_000_000_000,
        window_ms: 600_000,
        deltas: [Some(1); 9],
        idle_net: false,
        idle_disk: true,
    };
    let mut effects = vec![];
    // More rows than one insert of the copy takes (500), and not a multiple of it.
    for i in 0..1234 {
        effects.push(Effect::UpsertVm(vm("hv1", &format!("u{i}"))));
        effects.push(Effect::Journal(entry_at(i)));
        effects.push(Effect::Activity {
            node_id: "hv1".into(),
            uuid: format!("u{i}"),
            point,
        });
    }
    let ids = store.commit(&effects).unwrap();
    // The newest entry purged: its id must not be given again.
    let mut outbox = Outbox::open(&sqlite).unwrap();
    outbox.ack(&ids[..10]).unwrap();
    outbox.dead_letter(ids[10], 400, 1, 5).unwrap();
    BusCursor::open(&sqlite).unwrap().advance(ids[5]).unwrap();
    let mut reg = Registry::open(&sqlite).unwrap();
    reg.enroll("hv1", "KEY", 1).unwrap();
    reg.revoke("hv1", 2).unwrap();
    drop(store);

    let counts = vmwatch_master::store::migrate(&sqlite, &postgres).unwrap();
    let journal = counts.iter().find(|c| c.table == "journal").unwrap();
    assert_eq!((journal.source, journal.target), (1234, 1234));
    let activity = counts.iter().find(|c| c.table == "activity").unwrap();
    assert_eq!(activity.target, 1234);

    let mut a = Reader::open(&sqlite).unwrap();
    let mut b = Reader::open(&postgres).unwrap();
    let page = VmFilter {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(a.vms(&page).unwrap(), b.vms(&page).unwrap());
    let events = EventFilter {
        limit: 100,
        ..Default::default()
    };
    assert_eq!(a.events(&events).unwrap(), b.events(&events).unwrap());
    // The last insert of the copy, shorter than the others.
    let tail = EventFilter {
        after: 990,
        limit: 1000,
        ..Default::default()
    };
    let copied = b.events(&tail).unwrap();
    assert_eq!(copied.len(), 244);
    assert_eq!(a.events(&tail).unwrap(), copied);
    assert_eq!(a.dead_letters(10).unwrap(), b.dead_letters(10).unwrap());
    assert_eq!(a.nodes().unwrap(), b.nodes().unwrap());
    assert_eq!(
        a.activity("u3", None, 0, 100_000).unwrap(),
        b.activity("u3", None, 0, 100_000).unwrap()
    );
    assert_eq!(
        Outbox::open(&postgres).unwrap().depth().unwrap(),
        1223,
        "the outbox came along"
    );
    assert_eq!(
        BusCursor::open(&postgres).unwrap().position().unwrap(),
        ids[5]
    );
    let mut reg = Registry::open(&postgres).unwrap();
    assert_eq!(reg.all().unwrap()[0].revoked_at, Some(2));
    assert_eq!(
        reg.version().unwrap(),
        Registry::open(&sqlite).unwrap().version().unwrap()
    );
    let next = Store::open(&postgres)
        .unwrap()
        .commit(&[Effect::Journal(entry_at(99))])
        .unwrap();
    assert_eq!(next, [ids[1233] + 1], "ids continue after the source's");
    let again = vmwatch_master::store::migrate(&sqlite, &postgres)
        .expect_err("a second migrate is refused");
    assert!(again.to_string().contains("empty database"), "{again}");
}

/// `sslmode=verify-full` against a cluster serving a certificate from a CA the test makes:
/// connects with that CA; refused, with the reason, with another CA or another host name.
#[test]
fn tls_verify_full_connects_and_a_wrong_ca_is_refused() {
    let cluster = pg::Cluster::start(&format!("vmwatch-pg-tls-{}", std::process::id()))
        .expect("a second private cluster");
    let dir = cluster.dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    // The server's certificate names only `localhost`; another CA signs nothing of it.
    vmwatch_tests::broker::make_certificates(&dir, "vmwatch test CA", "DNS:localhost")
        .expect("certificates");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    vmwatch_tests::broker::make_certificates(&other, "another CA", "DNS:localhost")
        .expect("another CA");
    let chown = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(chown.success());
    std::fs::set_permissions(
        dir.join("server.key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let conf = cluster.dir.join("data/postgresql.auto.conf");
    std::fs::write(
        &conf,
        format!(
            "ssl = on\nssl_cert_file = '{0}/server.pem'\nssl_key_file = '{0}/server.key'\n",
            dir.display()
        ),
    )
    .unwrap();
    cluster.stop().unwrap();
    cluster.restart().unwrap();

    let (right, wrong) = (dir.join("ca.pem"), other.join("ca.pem"));
    let url = |host: &str, ca: &std::path::Path| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            cluster.port,
            ca.display()
        )
    };
    let open = |u: &str| {
        let db = Database::parse(u, Some(&cluster.password_file)).unwrap();
        Conn::open(&db, Purpose::Reader)
    };
    let mut conn = open(&url("localhost", &right)).expect("verify-full with the right CA");
    let ssl = conn
        .query_row(
            "SELECT CASE WHEN ssl THEN 1 ELSE 0 END FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap()
        .unwrap()
        .int(0)
        .unwrap();
    assert_eq!(ssl, 1, "the session is encrypted");
    let wrong_ca = open(&url("localhost", &wrong))
        .err()
        .expect("refused")
        .to_string();
    eprintln!("wrong CA: {wrong_ca}");
    assert!(
        wrong_ca.contains("certificate") && wrong_ca.contains("UnknownIssuer"),
        "{wrong_ca}"
    );
    let wrong_name = open(&url("127.0.0.1", &right))
        .err()
        .expect("refused")
        .to_string();
    eprintln!("wrong name: {wrong_name}");
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // verify-ca accepts the right CA under any name.
    let verify_ca = url("127.0.0.1", &right).replace("verify-full", "verify-ca");
    open(&verify_ca).expect("verify-ca with the right CA");
}

/// The leader lease (PostgreSQL): one holder at a time, renewals keep the epoch, a release or
/// an expiry lets another take it with a new epoch, and a fenced writer's commit is refused.
#[test]
fn the_leader_lease_has_one_holder_and_fences_the_old_one() {
    use std::time::Duration;
    use vmwatch_master::store::Lease;
    let [_, (_, db)] = <[_; 2]>::try_from(backends("lease")).ok().unwrap();
    drop(Store::open(&db).unwrap());
    let lease = Duration::from_secs(3);
    let mut a = Lease::open(&db, "a", lease).unwrap();
    let mut b = Lease::open(&db, "b", lease).unwrap();
    let first = a.claim(None).unwrap();
    assert!(first.leader, "{first:?}");
    let other = b.claim(None).unwrap();
    assert!(
        !other.leader && other.holder.as_deref() == Some("a"),
        "{other:?}"
    );
    let renewed = a.claim(Some(first.epoch)).unwrap();
    assert_eq!((renewed.leader, renewed.epoch), (true, first.epoch));
    let mut store = Store::open(&db).unwrap();
    store.fence(first.epoch);
    store.commit(&[Effect::Journal(entry_at(1))]).unwrap();
    a.release(first.epoch).unwrap();
    let taken = b.claim(None).unwrap();
    assert!(taken.leader && taken.epoch == first.epoch + 1, "{taken:?}");
    let lost = a.claim(Some(first.epoch)).unwrap();
    assert!(
        !lost.leader && lost.holder.as_deref() == Some("b"),
        "{lost:?}"
    );
    let err = store
        .commit(&[Effect::Journal(entry_at(2))])
        .expect_err("fenced");
    assert!(err.is_fenced(), "{err}");
    assert!(Lease::open(
        &Database::Sqlite(temp_dir("lease").join("m.db")),
        "a",
        lease
    )
    .is_err());
}
