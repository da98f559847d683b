//! Tests of the harness itself: a private libvirtd with the three guest kinds, their
//! counters, a libvirtd kill + restart with the guests surviving, two daemons at once, and
//! that Drop leaves nothing behind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::{DomainInfo, PrivateLibvirtd};
use vmwatch_tests::require_root_env;

/// The reaper test plants a leftover that looks like an instance of this very process; any
/// other test of this binary starting a daemon meanwhile would (rightly) reap it. The tests of
/// this file therefore run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Polls `f` until it returns `Some`, or panics with `what` and the last observation.
fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> T {
    let t0 = Instant::now();
    let mut last = String::from("(no observation)");
    loop {
        match f() {
            Ok(Some(v)) => {
                eprintln!("{what}: after {:.2?}", t0.elapsed());
                return v;
            }
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if t0.elapsed() >= timeout {
            panic!("{what}: not within {timeout:?}; last error: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The filesystem type mounted on `path`, from /proc/self/mounts (None: not a mount point).
fn mounted_fs(path: &std::path::Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("/proc/self/mounts");
    let path = path.to_str().expect("utf-8 path");
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_source, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (target == path).then(|| fstype.to_string())
    })
}

fn counter(stats: &BTreeMap<String, String>, key: &str) -> anyhow::Result<u64> {
    stats
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("no {key} in {stats:?}"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

fn states(lv: &PrivateLibvirtd) -> Vec<(String, String)> {
    lv.list_all()
        .expect("list_all")
        .into_iter()
        .map(|d| (d.name, d.state))
        .collect()
}

/// Everything an instance leaves on the machine, to check after Drop.
struct Footprint {
    dir: PathBuf,
    netns: String,
    pids: Vec<u32>,
}

impl Footprint {
    fn of(lv: &PrivateLibvirtd) -> Self {
        let mut pids = lv.qemu_pids();
        pids.extend(lv.pid());
        Footprint {
            dir: lv.dir().to_path_buf(),
            netns: lv.netns().to_string(),
            pids,
        }
    }

    fn assert_gone(&self) {
        for pid in &self.pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                .unwrap_or("gone");
            assert!(
                state == "gone" || state == "Z",
                "process {pid} survived Drop: {stat}"
            );
        }
        assert!(
            !std::path::Path::new("/run/netns")
                .join(&self.netns)
                .exists(),
            "netns {} survived Drop",
            self.netns
        );
        assert_eq!(
            mounted_fs(&self.dir.join("run")),
            None,
            "the tmpfs on {}/run survived Drop",
            self.dir.display()
        );
        if std::env::var("VMWATCH_KEEP_TEST_DIRS").as_deref() != Ok("1") {
            assert!(!self.dir.exists(), "{} survived Drop", self.dir.display());
        }
    }
}

#[test]
fn private_libvirtd_guests_counters_and_restart() {
    if !require_root_env("private_libvirtd_guests_counters_and_restart") {
        return;
    }
    let _serial = serial();
    let mut lv = PrivateLibvirtd::start("harness").expect("start private libvirtd");
    assert!(lv.is_running());
    // libvirtd's /run/libvirt is a tmpfs, as on a real host (see the harness's module doc).
    assert_eq!(mounted_fs(&lv.dir().join("run")).as_deref(), Some("tmpfs"));
    assert!(lv.list_all().expect("list_all").is_empty());

    let idle = lv.start_guest("h-idle", GuestKind::Idle).expect("idle");
    let writer = lv
        .start_guest("h-writer", GuestKind::DiskWriter)
        .expect("writer");
    let pxe = lv.start_guest("h-pxe", GuestKind::Pxe).expect("pxe");
    let started = Instant::now();

    let mut expected = vec![
        DomainInfo {
            uuid: idle.clone(),
            name: "h-idle".into(),
            state: "running".into(),
        },
        DomainInfo {
            uuid: writer.clone(),
            name: "h-writer".into(),
            state: "running".into(),
        },
        DomainInfo {
            uuid: pxe.clone(),
            name: "h-pxe".into(),
            state: "running".into(),
        },
    ];
    expected.sort();
    assert_eq!(lv.list_all().expect("list_all"), expected);
    assert_eq!(lv.domstate("h-writer").expect("domstate"), "running");

    // The disk writer writes about once a second.
    let first = counter(
        &lv.domstats(&writer, &["--block"]).expect("domstats"),
        "block.0.wr.reqs",
    )
    .expect("wr.reqs");
    let rose = poll_until(
        "writer's block.0.wr.reqs rises",
        Duration::from_secs(15),
        || {
            let n = counter(&lv.domstats(&writer, &["--block"])?, "block.0.wr.reqs")?;
            Ok((n > first).then_some(n))
        },
    );
    eprintln!("wr.reqs {first} -> {rose}");

    // iPXE sends DHCP requests.
    let tx = poll_until("pxe's net.0.tx.pkts > 0", Duration::from_secs(30), || {
        let n = counter(&lv.domstats(&pxe, &["--interface"])?, "net.0.tx.pkts")?;
        Ok((n > 0).then_some(n))
    });
    eprintln!("pxe tx.pkts {tx} after {:.2?}", started.elapsed());

    // The idle guest neither writes nor sends.
    let s = lv
        .domstats(&idle, &["--interface", "--block"])
        .expect("domstats idle");
    assert_eq!(counter(&s, "block.0.wr.reqs").expect("wr"), 0, "{s:?}");
    assert_eq!(counter(&s, "net.0.tx.pkts").expect("tx"), 0, "{s:?}");

    // Kill libvirtd: the guests keep running.
    let qemus = lv.qemu_pids();
    assert_eq!(qemus.len(), 3, "qemu processes: {qemus:?}");
    let old_daemon = lv.pid().expect("libvirtd pid");
    lv.kill();
    assert!(!lv.is_running());
    assert!(lv.pid().is_none());
    assert!(lv.virsh(&["list"]).is_err(), "virsh answered after kill");
    assert!(
        !std::path::Path::new(&format!("/proc/{old_daemon}")).exists(),
        "libvirtd {old_daemon} not reaped"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lv.qemu_pids(), qemus, "qemu processes died with libvirtd");

    lv.restart().expect("restart");
    assert!(lv.is_running());
    assert_ne!(lv.pid(), Some(old_daemon));
    assert_eq!(lv.list_all().expect("list_all after restart"), expected);
    assert_eq!(lv.qemu_pids(), qemus);

    // Counters still work after the restart (the tap is found again in the named netns).
    let s = lv.domstats(&pxe, &["--interface"]).expect("domstats pxe");
    assert!(counter(&s, "net.0.tx.pkts").expect("tx") >= tx, "{s:?}");
    let before = counter(
        &lv.domstats(&writer, &["--block"]).expect("domstats"),
        "block.0.wr.reqs",
    )
    .expect("wr.reqs");
    poll_until(
        "writer's block.0.wr.reqs rises after restart",
        Duration::from_secs(15),
        || {
            let n = counter(&lv.domstats(&writer, &["--block"])?, "block.0.wr.reqs")?;
            Ok((n > before).then_some(n))
        },
    );

    // Shut off / start round trip is reflected by list_all.
    lv.virsh(&["destroy", "h-idle"]).expect("destroy");
    let st = states(&lv);
    assert!(
        st.contains(&("h-idle".to_string(), "shutoff".to_string())),
        "{st:?}"
    );
    assert_eq!(lv.domstate(&idle).expect("domstate"), "shutoff");
    lv.virsh(&["suspend", "h-writer"]).expect("suspend");
    assert_eq!(lv.domstate(&writer).expect("domstate"), "paused");
    let st = states(&lv);
    assert!(
        st.contains(&("h-writer".to_string(), "paused".to_string())),
        "{st:?}"
    );

    let footprint = Footprint::of(&lv);
    assert_eq!(footprint.pids.len(), 3, "{:?}", footprint.pids); // 2 qemu + libvirtd
    let t0 = Instant::now();
    drop(lv);
    eprintln!("drop took {:.2?}", t0.elapsed());
    footprint.assert_gone();
}

#[test]
fn two_daemons_same_uuid() {
    if !require_root_env("two_daemons_same_uuid") {
        return;
    }
    let _serial = serial();
    // Start both at once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PrivateLibvirtd::start("twin-a"));
        let b = s.spawn(|| PrivateLibvirtd::start("twin-b"));
        (
            a.join().expect("thread a").expect("start a"),
            b.join().expect("thread b").expect("start b"),
        )
    });
    assert_ne!(a.uri(), b.uri());
    assert_ne!(a.netns(), b.netns());

    let uuid = vmwatch_tests::guests::random_uuid().expect("uuid");
    for lv in [&a, &b] {
        lv.define_guest_with_uuid("twin", &uuid, GuestKind::Idle)
            .expect("define");
        lv.virsh(&["start", &uuid]).expect("start");
    }
    let expected = vec![DomainInfo {
        uuid: uuid.clone(),
        name: "twin".into(),
        state: "running".into(),
    }];
    assert_eq!(a.list_all().expect("list a"), expected);
    assert_eq!(b.list_all().expect("list b"), expected);

    let (qa, qb) = (a.qemu_pids(), b.qemu_pids());
    assert_eq!(qa.len(), 1, "{qa:?}");
    assert_eq!(qb.len(), 1, "{qb:?}");
    assert_ne!(qa, qb);

    // Destroying on one leaves the other running.
    a.virsh(&["destroy", &uuid]).expect("destroy on a");
    assert_eq!(a.domstate(&uuid).expect("state a"), "shutoff");
    assert_eq!(b.domstate(&uuid).expect("state b"), "running");

    let (fa, fb) = (Footprint::of(&a), Footprint::of(&b));
    drop(a);
    drop(b);
    fa.assert_gone();
    fb.assert_gone();
}

#[test]
fn stale_leftovers_are_reaped() {
    if !require_root_env("stale_leftovers_are_reaped") {
        return;
    }
    let _serial = serial();
    // Leftovers that look like an instance of an earlier process with our pid (pid reuse):
    // a namespace with a process in it, and a directory.
    let pid = std::process::id();
    let netns = format!("vmwt{pid}-4000000000");
    let dir = std::env::temp_dir().join(format!("vmwatch-lv-leftover-{pid}-4000000000"));
    std::fs::create_dir_all(dir.join("images")).expect("leftover dir");
    // With its tmpfs still mounted on run/, as a SIGKILLed owner leaves it.
    std::fs::create_dir_all(dir.join("run")).expect("leftover run dir");
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "vmwatch-lv-run"])
        .arg(dir.join("run"))
        .status()
        .expect("mount");
    assert!(ok.success());
    std::fs::write(dir.join("run/libvirtd.pid"), "1").expect("a file in the leftover tmpfs");
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .expect("ip netns add");
    assert!(ok.success());
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &netns, "sleep", "120"])
        .spawn()
        .expect("sleep in leftover netns");
    let sleeper_pid = sleeper.id();
    // Wait until it has really entered the namespace (ip does setns, then execs sleep).
    poll_until(
        "sleeper inside the leftover netns",
        Duration::from_secs(10),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{sleeper_pid}/comm"))?;
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", &netns])
                .output()?;
            let inside = String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == sleeper_pid.to_string());
            Ok((comm.trim() == "sleep" && inside).then_some(()))
        },
    );

    let lv = PrivateLibvirtd::start("reaper").expect("start");
    assert!(
        !std::path::Path::new("/run/netns").join(&netns).exists(),
        "leftover netns {netns} not reaped"
    );
    assert_eq!(
        mounted_fs(&dir.join("run")),
        None,
        "leftover tmpfs not unmounted"
    );
    assert!(!dir.exists(), "leftover dir {} not reaped", dir.display());
    let status = sleeper.wait().expect("wait sleeper");
    assert!(
        !status.success(),
        "sleeper {sleeper_pid} was not killed: {status}"
    );
    drop(lv);
}
