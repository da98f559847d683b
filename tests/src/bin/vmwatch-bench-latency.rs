//! Benchmark (not a test): latency from a libvirt action to the master's API showing it, and
//! the daemons' footprint with the three demo guests.
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-latency [-- ROUNDS]` as root.
//! Starts a private libvirtd with the three demo guests, a master and a node (the release
//! binaries next to this one), then suspends/resumes the idle guest ROUNDS times (default 20).
//! For each action it measures from the moment the command is written to an already connected
//! interactive `virsh` (so no process start or connection is counted) to the first API answer
//! that shows the new state (polled every millisecond). Prints median,
//! p90 and worst, then RSS and CPU of node and master over a 30 s quiet period.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{cpu_ticks, rss_kib, temp_dir, wait_for, Master, Node};

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("ROUNDS")?
        .unwrap_or(20);
    let lv = PrivateLibvirtd::start("bench")?;
    let idle = lv.start_guest("bench-idle", GuestKind::Idle)?;
    lv.start_guest("bench-writer", GuestKind::DiskWriter)?;
    lv.start_guest("bench-pxe", GuestKind::Pxe)?;
    let dir = temp_dir("bench");
    let master = Master::start(&dir, &[("log_level", "info")])?;
    let node = Node::start(
        &dir,
        "bench",
        &master.endpoint(),
        &lv.uri(),
        &[("log_level", "info"), ("stats_interval", "600")],
    )?;
    wait_for(Duration::from_secs(30), "node up", || {
        master.node("bench").filter(|n| n["libvirt_up"] == true)
    });
    wait_for(Duration::from_secs(10), "guest running in the API", || {
        (master.vm_state(&idle, "bench").as_deref() == Some("running")).then_some(())
    });

    let mut virsh = std::process::Command::new("virsh")
        .args(["-q", "-c", &lv.uri()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("interactive virsh")?;
    let mut stdin = virsh.stdin.take().context("virsh stdin")?;
    use std::io::Write;
    writeln!(stdin, "list")?;
    stdin.flush()?;
    std::thread::sleep(Duration::from_millis(500)); // let it connect before the first timing
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let (cmd, want) = if i % 2 == 0 {
            ("suspend", "paused")
        } else {
            ("resume", "running")
        };
        let t0 = Instant::now();
        writeln!(stdin, "{cmd} bench-idle")?;
        stdin.flush()?;
        loop {
            if master.vm_state(&idle, "bench").as_deref() == Some(want) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                anyhow::bail!("{cmd}: state {want} not visible within 10 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        samples.push(t0.elapsed());
    }
    drop(stdin);
    let _ = virsh.wait();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "libvirt action -> API ({rounds} suspend/resume actions): median {:.1} ms, p90 {:.1} ms, worst {:.1} ms",
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() * 9 / 10]),
        ms(samples[samples.len() - 1])
    );

    let (np, mp) = (
        node.pid().context("node pid")?,
        master.pid().context("master pid")?,
    );
    let (n0, m0, t0) = (
        cpu_ticks(np).unwrap_or(0),
        cpu_ticks(mp).unwrap_or(0),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(30));
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let pct = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / hz / secs * 100.0;
    println!(
        "quiet 30 s with 3 guests: node RSS {} KiB, CPU {:.3} % of a core; master RSS {} KiB, CPU {:.3} %",
        rss_kib(np).unwrap_or(0),
        pct(n0, cpu_ticks(np).unwrap_or(0)),
        rss_kib(mp).unwrap_or(0),
        pct(m0, cpu_ticks(mp).unwrap_or(0)),
    );
    Ok(())
}
