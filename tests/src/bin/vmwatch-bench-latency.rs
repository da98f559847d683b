//! Benchmark (not a test): latency from a libvirt action to the master's API showing it, and
//! the daemons' footprint with the three demo guests.
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-latency [-- ROUNDS]` as root.
//! Starts a private libvirtd with the three demo guests, a master and a node (the release
//! binaries next to this one), then suspends/resumes the idle guest ROUNDS times (default 100).
//! For each action it measures from the moment the command is written to an already connected
//! interactive `virsh` (so no process start or connection is counted) to the answer of a
//! `GET /api/v1/vms/{uuid}/wait` long-poll asked just before. Prints median,
//! p90, p99 and worst, then RSS and CPU of node and master over a 30 s quiet period.
//!
//! The floor is measured in the same run, on the same actions: a bare lifecycle-callback
//! listener (`virsh event --loop --event lifecycle`, libvirt's own client, connected before the
//! first action) and the moment it prints each event. No agent can see an event before that.
//!
//! Then the breakdown per hop, from the daemons' debug lines (µs time stamps, one clock): the
//! action → the node's lifecycle callback → the node's core has the facts (the domain's state
//! read back from libvirtd) → the message handed to the socket → the master authenticated it →
//! the writer committed it → the long-poll answered → the client has the answer. Both daemons
//! log at debug level for this (a few µs a line).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{percentile, rss_kib, temp_dir, wait_for, CpuMeter, Master, Node};

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
    let master = Master::start(&dir, &[("log_level", "debug")])?;
    let node = Node::start(
        &dir,
        "bench",
        &master.endpoint(),
        &lv.uri(),
        &[("log_level", "debug"), ("stats_interval", "600")],
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
    let stdin = virsh.stdin.take().context("virsh stdin")?;
    // The floor: a bare listener, each of its lines time-stamped as it arrives.
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
    let (seen_tx, seen) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(events).lines() {
            let Ok(line) = line else { break };
            if seen_tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut bench = Bench {
        stdin,
        master: &master,
        uuid: &idle,
        seen,
    };
    // Warm-up: both virsh clients connect in their own time; actions (alternating suspend and
    // resume, as all of them do) are repeated until the listener reports one. Nothing before
    // that is timed.
    let mut action = 0;
    wait_for(
        Duration::from_secs(60),
        "the bare listener to report an action",
        || {
            action += 1;
            bench.round(action - 1, Duration::from_secs(2)).ok()?.1
        },
    );
    let mut samples = Vec::with_capacity(rounds);
    let mut floor = Vec::with_capacity(rounds);
    let mut spans = Vec::with_capacity(rounds);
    for i in action..action + rounds {
        let started = unix_us();
        let (product, bare) = bench.round(i, Duration::from_secs(10))?;
        spans.push((started, started + product.as_micros() as i64));
        samples.push(product);
        floor.push(bare.context("the bare listener saw no event")?);
        // The next action waits for this round's lines (the long-poll may answer before the
        // writer's line is written).
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(bench);
    let _ = virsh.wait();
    let _ = listener.kill();
    let _ = listener.wait();
    samples.sort();
    floor.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let q = |v: &[Duration], p: f64| ms(percentile(v, p));
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

    print_hops(&spans, &node.log_text(), &master.log_text());

    let (node_cpu, master_cpu) = (
        CpuMeter::start(node.pid().context("node pid")?),
        CpuMeter::start(master.pid().context("master pid")?),
    );
    std::thread::sleep(Duration::from_secs(30));
    println!(
        "quiet 30 s with 3 guests: node RSS {} KiB, CPU {:.3} % of a core; master RSS {} KiB, CPU {:.3} %",
        rss_kib(node_cpu.pid).unwrap_or(0),
        node_cpu.percent(),
        rss_kib(master_cpu.pid).unwrap_or(0),
        master_cpu.percent(),
    );
    Ok(())
}

/// The interactive virsh, the API and the bare listener of one run.
struct Bench<'a> {
    stdin: std::process::ChildStdin,
    master: &'a Master,
    uuid: &'a str,
    seen: std::sync::mpsc::Receiver<(Instant, String)>,
}

impl Bench<'_> {
    /// Action `i` (suspend when even, resume when odd): how long until the API's long-poll
    /// answers, and until the bare listener printed that event (`None` if it did not within
    /// `wait`).
    fn round(&mut self, i: usize, wait: Duration) -> Result<(Duration, Option<Duration>)> {
        use std::io::Write;
        let (cmd, want, event) = if i.is_multiple_of(2) {
            ("suspend", "paused", "Suspended")
        } else {
            ("resume", "running", "Resumed")
        };
        // Lines of earlier actions are not this one's.
        while self.seen.try_recv().is_ok() {}
        // A panel's long-poll, asked before the action: it answers when the core commits the
        // change (or at once, if it is already visible).
        let url = self.master.url(&format!(
            "/api/v1/vms/{}/wait?state={want}&timeout=10",
            self.uuid
        ));
        let waiter = std::thread::spawn(move || -> Result<Instant> {
            let v: serde_json::Value = ureq::get(&url).call()?.into_json()?;
            anyhow::ensure!(v["reached"] == true, "state not reached: {v}");
            Ok(Instant::now())
        });
        let t0 = Instant::now();
        writeln!(self.stdin, "{cmd} bench-idle")?;
        self.stdin.flush()?;
        let visible = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("waiter panicked"))?
            .with_context(|| format!("{cmd}: state {want} not visible within 10 s"))?;
        let deadline = t0 + wait;
        let bare = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.seen.recv_timeout(left) {
                Ok((at, line)) if line.contains("bench-idle") && line.contains(event) => {
                    break Some(at.saturating_duration_since(t0))
                }
                Ok(_) => {}
                Err(_) => break None,
            }
        };
        Ok((visible.saturating_duration_since(t0), bare))
    }
}

/// Unix time in µs.
fn unix_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A log line's time stamp (`2026-12-07T05:25:17.934105Z …`) as unix µs.
fn line_us(line: &str) -> Option<i64> {
    let b = line.as_bytes();
    if b.len() < 27 || b[10] != b'T' || b[26] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| line.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let secs = days * 86_400 + num(11..13)? * 3600 + num(14..16)? * 60 + num(17..19)?;
    Some(secs * 1_000_000 + num(20..26)?)
}

/// Prints the median and p90 of each hop of the actions in `spans` (start and answer, unix µs).
fn print_hops(spans: &[(i64, i64)], node_log: &str, master_log: &str) {
    let lines = |log: &str, marks: &[&str]| -> Vec<i64> {
        log.lines()
            .filter(|l| marks.iter().all(|m| l.contains(m)))
            .filter_map(line_us)
            .collect()
    };
    // Each hop's lines, in order; a round takes the first of each at or after the hop before.
    let hops: [(&str, Vec<i64>); 6] = [
        (
            "action -> node's lifecycle callback",
            lines(node_log, &["lifecycle callback"]),
        ),
        (
            "callback -> facts in the node's core (state read back)",
            lines(node_log, &["DEBUG event uuid="]),
        ),
        (
            "facts -> handed to the socket",
            lines(node_log, &["handed to the socket", "event"]),
        ),
        (
            "socket -> master authenticated it",
            lines(master_log, &["authenticated", "kind=\"event\""]),
        ),
        (
            "authenticated -> committed",
            lines(master_log, &["committed journal_entries=1"]),
        ),
        (
            "committed -> long-poll answered",
            lines(master_log, &["wait answered"]),
        ),
    ];
    let mut per_hop: Vec<Vec<i64>> = vec![Vec::new(); hops.len() + 1];
    let mut complete = 0;
    'round: for &(start, answered) in spans {
        let mut at = start;
        let mut deltas = Vec::with_capacity(hops.len() + 1);
        for (_, times) in &hops {
            let Some(&t) = times.iter().find(|&&t| t >= at) else {
                continue 'round;
            };
            deltas.push(t - at);
            at = t;
        }
        deltas.push(answered - at);
        for (h, d) in deltas.into_iter().enumerate() {
            per_hop[h].push(d);
        }
        complete += 1;
    }
    println!(
        "per hop ({complete} of {} actions found in both logs; median / p90):",
        spans.len()
    );
    let names = hops
        .iter()
        .map(|(n, _)| *n)
        .chain(["answered -> the client has it"]);
    for (name, mut v) in names.zip(per_hop) {
        v.sort();
        let q = |p: f64| {
            v.get(((v.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        println!(
            "  {name}: {:.2} / {:.2} ms",
            q(0.5) as f64 / 1000.0,
            q(0.9) as f64 / 1000.0
        );
    }
}
