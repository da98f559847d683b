//! Benchmark (not a test): latency from a libvirt action to the master's API showing it, and
//! the daemons' footprint with the three demo guests.
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-latency [-- ROUNDS]` as root.
//! Starts a private libvirtd with the three demo guests, a master and a node (the release
//! binaries next to this one), then suspends/resumes the idle guest ROUNDS times (default 20).
//! For each action it measures from the moment the command is written to an already connected
//! interactive `virsh` (so no process start or connection is counted) to the answer of a
//! `GET /api/v1/vms/{uuid}/wait` long-poll asked just before. Prints median,
//! p90, p99 and worst, then RSS and CPU of node and master over a 30 s quiet period.
//!
//! The floor is measured in the same run, on the same actions: a bare lifecycle-callback
//! listener (`virsh event --loop --event lifecycle`, libvirt's own client, connected before the
//! first action) and the moment it prints each event. No agent can see an event before that.

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
        .unwrap_or(100);
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
                                                    // The floor: a bare listener, its lines time-stamped as they arrive.
    let mut listener = std::process::Command::new("virsh")
        .args([
            "-q",
            "-c",
            &lv.uri(),
            "event",
            "--loop",
            "--event",
            "lifecycle",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("virsh event")?;
    let events = listener.stdout.take().context("virsh event stdout")?;
    let (seen_tx, seen) = std::sync::mpsc::channel::<Instant>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(events).lines() {
            let Ok(line) = line else { break };
            if line.contains("bench-idle") && seen_tx.send(Instant::now()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500)); // connected and registered
    let mut samples = Vec::with_capacity(rounds);
    let mut floor = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let (cmd, want) = if i % 2 == 0 {
            ("suspend", "paused")
        } else {
            ("resume", "running")
        };
        // A panel's long-poll, asked before the action: it answers when the core commits the
        // change (or at once, if it is already visible).
        let url = master.url(&format!("/api/v1/vms/{idle}/wait?state={want}&timeout=10"));
        let waiter = std::thread::spawn(move || -> Result<Instant> {
            let v: serde_json::Value = ureq::get(&url).call()?.into_json()?;
            anyhow::ensure!(v["reached"] == true, "state not reached: {v}");
            Ok(Instant::now())
        });
        let t0 = Instant::now();
        writeln!(stdin, "{cmd} bench-idle")?;
        stdin.flush()?;
        let visible = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter panicked"))?
            .with_context(|| format!("{cmd}: state {want} not visible within 10 s"))?;
        samples.push(visible.saturating_duration_since(t0));
        let at = seen
            .recv_timeout(Duration::from_secs(10))
            .context("the bare listener saw no event")?;
        floor.push(at.saturating_duration_since(t0));
        // The next action starts from a quiet state.
        while seen.try_recv().is_ok() {}
    }
    drop(stdin);
    let _ = virsh.wait();
    let _ = listener.kill();
    let _ = listener.wait();
    samples.sort();
    floor.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let q = |v: &[Duration], p: f64| ms(v[((v.len() as f64 * p) as usize).min(v.len() - 1)]);
    println!(
        "libvirt action -> API ({rounds} suspend/resume actions): median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, worst {:.1} ms",
        q(&samples, 0.5),
        q(&samples, 0.9),
        q(&samples, 0.99),
        ms(samples[samples.len() - 1])
    );
    println!(
        "floor, same actions (bare lifecycle listener, virsh event): median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, worst {:.1} ms; product - floor: median +{:.1} ms, p99 +{:.1} ms",
        q(&floor, 0.5),
        q(&floor, 0.9),
        q(&floor, 0.99),
        ms(floor[floor.len() - 1]),
        q(&samples, 0.5) - q(&floor, 0.5),
        q(&samples, 0.99) - q(&floor, 0.99)
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
