//! Benchmark (not a test): the node agent side by side with collectd's virt plugin, the
//! reference every figure is a ratio against (collectd 5.12 from Debian's `collectd-core`,
//! installed here when missing).
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-collectd [-- GUESTS [SECONDS]]`
//! as root (defaults: 20 guests, 120 s). Starts a private libvirtd with GUESTS idle guests, a
//! master and the real node (`stats_interval=10`), and collectd polling the same libvirtd every
//! 10 s (virt plugin, csv writer). After a 30 s warm-up it measures, over SECONDS each: libvirtd
//! with no client, then the node alone, then collectd alone: the CPU of each client, what each
//! costs libvirtd (its CPU with that client less its CPU with none), and at the end RSS, PSS
//! and private memory of each. RSS counts every
//! shared library page both programs map (both link the libvirt client stack), so PSS and
//! private memory are printed beside it, private split into dirty (heap, stacks, relocated
//! library data) and clean (file pages only this process maps: mostly its own binary).
//!
//! The node measured is the one the packages ship, built with the `release-node` profile
//! (`cargo build --profile release-node -p vmwatch-node`, next to `target/release/`), when it
//! has been built; `VMWATCH_NODE_BIN` names another. The first line says which.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{bin, proc_kib, temp_dir, wait_for, Master, Node};

const WARM_UP: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, name: &str, default: u64| -> Result<u64> {
        args.get(i)
            .map_or(Ok(default), |a| a.parse().context(name.to_owned()))
    };
    let guests = arg(0, "GUESTS", 20)? as usize;
    let seconds = arg(1, "SECONDS", 120)?;
    install_collectd()?;
    // The node the packages ship: built with the `release-node` profile (Cargo.toml), sized for
    // this comparison. Taken when built (`cargo build --profile release-node -p vmwatch-node`),
    // unless VMWATCH_NODE_BIN names another.
    if std::env::var_os("VMWATCH_NODE_BIN").is_none_or(|p| p.is_empty()) {
        let shipped = bin("vmwatch-node")
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("release-node").join("vmwatch-node"));
        if let Some(shipped) = shipped.filter(|p| p.exists()) {
            std::env::set_var("VMWATCH_NODE_BIN", shipped);
        }
    }
    let node_bin = bin("vmwatch-node");
    let size = std::fs::metadata(&node_bin)
        .with_context(|| format!("{}", node_bin.display()))?
        .len();
    println!("node binary: {} ({size} bytes)", node_bin.display());
    let lv = PrivateLibvirtd::start("benchcollectd")?;
    for i in 0..guests {
        lv.start_guest(&format!("bench-{i:03}"), GuestKind::Idle)?;
    }
    let libvirtd = lv.pid().context("libvirtd pid")?;
    let dir = temp_dir("benchcollectd");

    // libvirtd with no client but its guests: what neither of the two costs it.
    std::thread::sleep(WARM_UP);
    let libvirtd_alone = cpu_over(libvirtd, seconds);

    // The node alone.
    let master = Master::start(&dir, &[("log_level", "warn")])?;
    let mut node = Node::start(
        &dir,
        "bench",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "10"), ("log_level", "warn")],
    )?;
    wait_for(Duration::from_secs(60), "the node's VMs in the API", || {
        (master.vms_of("bench").ok()?.len() >= guests).then_some(())
    });
    std::thread::sleep(WARM_UP);
    let node_pid = node.pid().context("node pid")?;
    let (node_cpu, node_libvirtd_cpu) = cpu_of_two(node_pid, libvirtd, seconds);
    let node_mem = Memory::of(node_pid)?;
    node.stop()?;

    // collectd alone, on the same libvirtd and guests.
    let mut collectd = start_collectd(&dir, &lv.uri())?;
    let values = dir.join("csv");
    wait_for(Duration::from_secs(60), "collectd's first values", || {
        values.exists().then_some(())
    });
    std::thread::sleep(WARM_UP);
    if let Some(status) = collectd.try_wait()? {
        bail!(
            "collectd exited with {status}; see {}",
            dir.join("collectd.log").display()
        );
    }
    let collectd_pid = collectd.id();
    let (collectd_cpu, collectd_libvirtd_cpu) = cpu_of_two(collectd_pid, libvirtd, seconds);
    let collectd_mem = Memory::of(collectd_pid)?;
    let _ = collectd.kill();
    let _ = collectd.wait();

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!(
        "{guests} guests, every 10 s, {seconds} s each (after {} s of warm-up):",
        WARM_UP.as_secs()
    );
    println!(
        "  CPU            node {node_cpu:.3} %   collectd {collectd_cpu:.3} %   ratio {:.2}",
        ratio(node_cpu, collectd_cpu)
    );
    // What each client costs libvirtd: its CPU with that client, less its CPU with none.
    let (node_cost, collectd_cost) = (
        node_libvirtd_cpu - libvirtd_alone,
        collectd_libvirtd_cpu - libvirtd_alone,
    );
    println!(
        "  libvirtd CPU   alone {libvirtd_alone:.3} %   with node {node_libvirtd_cpu:.3} % (+{node_cost:.3})   with collectd {collectd_libvirtd_cpu:.3} % (+{collectd_cost:.3})   ratio of the costs {:.2}",
        ratio(node_cost, collectd_cost)
    );
    for (what, n, c) in [
        ("RSS", node_mem.rss, collectd_mem.rss),
        ("PSS", node_mem.pss, collectd_mem.pss),
        ("private", node_mem.private(), collectd_mem.private()),
        (
            "  of it dirty",
            node_mem.private_dirty,
            collectd_mem.private_dirty,
        ),
        (
            "  of it clean",
            node_mem.private_clean,
            collectd_mem.private_clean,
        ),
    ] {
        println!(
            "  {what:<14} node {:.1} MiB   collectd {:.1} MiB   ratio {:.2}",
            n as f64 / 1024.0,
            c as f64 / 1024.0,
            ratio(n as f64, c as f64)
        );
    }
    Ok(())
}

/// Debian's collectd (the reference), installed when missing.
fn install_collectd() -> Result<()> {
    if Path::new("/usr/sbin/collectd").exists() {
        return Ok(());
    }
    let status = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "collectd-core",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get")?;
    if !status.success() {
        bail!("apt-get install collectd-core failed: {status}");
    }
    Ok(())
}

fn start_collectd(dir: &Path, uri: &str) -> Result<Child> {
    let conf = dir.join("collectd.conf");
    std::fs::write(
        &conf,
        format!(
            "Interval 10\n\
             BaseDir \"{dir}\"\n\
             PIDFile \"{dir}/collectd.pid\"\n\
             PluginDir \"/usr/lib/collectd\"\n\
             TypesDB \"/usr/share/collectd/types.db\"\n\
             LoadPlugin logfile\n\
             <Plugin logfile>\n  LogLevel \"info\"\n  File \"{dir}/collectd.log\"\n</Plugin>\n\
             LoadPlugin virt\n\
             <Plugin virt>\n  Connection \"{uri}\"\n  RefreshInterval 60\n  HostnameFormat name\n</Plugin>\n\
             LoadPlugin csv\n\
             <Plugin csv>\n  DataDir \"{dir}/csv\"\n</Plugin>\n",
            dir = dir.display()
        ),
    )?;
    Command::new("/usr/sbin/collectd")
        .args(["-f", "-C"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("collectd.stderr"))?)
        .spawn()
        .context("collectd")
}

/// Two processes' CPU over the same `seconds`, in % of one core.
fn cpu_of_two(a: u32, b: u32, seconds: u64) -> (f64, f64) {
    let (a, b) = (SchedMeter::start(a), SchedMeter::start(b));
    std::thread::sleep(Duration::from_secs(seconds));
    (a.percent(), b.percent())
}

/// One process's CPU over `seconds`, in % of one core.
fn cpu_over(pid: u32, seconds: u64) -> f64 {
    let meter = SchedMeter::start(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    meter.percent()
}

/// CPU time in ns from the scheduler (`/proc/PID/task/*/schedstat`), not in 10 ms ticks: at
/// 0.1 % of a core a minute is 6 ticks, too coarse for a ratio. A thread that ends within the
/// window takes its time with it; the node's, collectd's and libvirtd's threads live on.
struct SchedMeter {
    pid: u32,
    ns: u64,
    at: std::time::Instant,
}

impl SchedMeter {
    fn start(pid: u32) -> SchedMeter {
        SchedMeter {
            pid,
            ns: sched_ns(pid),
            at: std::time::Instant::now(),
        }
    }

    fn percent(&self) -> f64 {
        let used = sched_ns(self.pid).saturating_sub(self.ns) as f64 / 1e9;
        used / self.at.elapsed().as_secs_f64() * 100.0
    }
}

/// The on-CPU time of every thread of `pid`, in ns (0 if it is gone).
fn sched_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Resident memory of a process, in KiB, from `/proc/PID/smaps_rollup`.
struct Memory {
    rss: u64,
    pss: u64,
    /// Private dirty: heap, stacks, relocated library data; the kernel can only swap it.
    private_dirty: u64,
    /// Private clean: file pages only this process maps (mostly its own binary's code and
    /// read-only data); the kernel can drop them and read them again.
    private_clean: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let path = format!("/proc/{pid}/smaps_rollup");
        let field = |name| proc_kib(&path, name).with_context(|| format!("{name} in {path}"));
        Ok(Memory {
            rss: field("Rss:")?,
            pss: field("Pss:")?,
            private_dirty: field("Private_Dirty:")?,
            private_clean: field("Private_Clean:")?,
        })
    }

    /// Private clean and dirty: what the process holds that nothing else shares.
    fn private(&self) -> u64 {
        self.private_dirty + self.private_clean
    }
}
