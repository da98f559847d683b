//! Benchmark (not a test): the node agent side by side with collectd's virt plugin, the
//! reference every figure is a ratio against (collectd 5.12 from Debian's `collectd-core`,
//! installed here when missing).
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-collectd [-- GUESTS [SECONDS]]`
//! as root (defaults: 20 guests, 120 s). Starts a private libvirtd with GUESTS idle guests, a
//! master and the real node (`stats_interval=10`), and collectd polling the same libvirtd every
//! 10 s (virt plugin, csv writer). After a 30 s warm-up it measures, over SECONDS: the CPU of
//! each, the CPU of libvirtd (what the two cost it, measured once with the node alone and once
//! with collectd alone), and at the end RSS, PSS and private memory of each. RSS counts every
//! shared library page both programs map (both link the libvirt client stack), so PSS and
//! private memory are printed beside it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{cpu_ticks, temp_dir, wait_for, Master, Node};

const WARM_UP: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let guests: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("GUESTS")?
        .unwrap_or(20);
    let seconds: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()
        .context("SECONDS")?
        .unwrap_or(120);
    install_collectd()?;
    let lv = PrivateLibvirtd::start("benchcollectd")?;
    for i in 0..guests {
        lv.start_guest(&format!("bench-{i:03}"), GuestKind::Idle)?;
    }
    let libvirtd = lv.pid().context("libvirtd pid")?;
    let dir = temp_dir("benchcollectd");

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
    let (node_cpu, node_libvirtd_cpu) = cpu_of(&[node_pid, libvirtd], seconds);
    let node_mem = Memory::of(node_pid)?;
    node.stop()?;

    // collectd alone, on the same libvirtd and guests.
    let mut collectd = start_collectd(&dir, &lv.uri())?;
    std::thread::sleep(WARM_UP);
    if let Some(status) = collectd.try_wait()? {
        bail!(
            "collectd exited with {status}; see {}",
            dir.join("collectd.log").display()
        );
    }
    let collectd_pid = collectd.id();
    let values = dir.join("csv");
    if !values.exists() {
        bail!("collectd wrote no values in {}", values.display());
    }
    let (collectd_cpu, collectd_libvirtd_cpu) = cpu_of(&[collectd_pid, libvirtd], seconds);
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
    println!(
        "  libvirtd CPU   with node {node_libvirtd_cpu:.3} %   with collectd {collectd_libvirtd_cpu:.3} %   ratio {:.2}",
        ratio(node_libvirtd_cpu, collectd_libvirtd_cpu)
    );
    for (what, n, c) in [
        ("RSS", node_mem.rss, collectd_mem.rss),
        ("PSS", node_mem.pss, collectd_mem.pss),
        ("private", node_mem.private, collectd_mem.private),
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

/// Each process's CPU over `seconds`, in % of one core.
fn cpu_of(pids: &[u32], seconds: u64) -> (f64, f64) {
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let pct: Vec<f64> = pids
        .iter()
        .zip(before)
        .map(|(p, b)| cpu_ticks(*p).unwrap_or(0).saturating_sub(b) as f64 / hz / secs * 100.0)
        .collect();
    (pct[0], pct[1])
}

/// Resident memory of a process, in KiB, from `/proc/PID/smaps_rollup`.
struct Memory {
    rss: u64,
    pss: u64,
    /// Private clean and dirty: what the process holds that nothing else shares.
    private: u64,
}

impl Memory {
    fn of(pid: u32) -> Result<Memory> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Ok(Memory {
            rss: field("Rss:"),
            pss: field("Pss:"),
            private: field("Private_Clean:") + field("Private_Dirty:"),
        })
    }
}
