//! Benchmark (not a test): how fast the status page shows its first VM rows with 10,000 VMs
//! in the master's database.
//!
//! ```text
//! cargo run --release -p vmwatch-tests --bin vmwatch-bench-page -- [--nodes 200] [--vms 50] [--loads 5] [--hold SECONDS]
//! ```
//!
//! Starts a master (the binary next to this one), feeds it `nodes` × `vms` VMs through the real
//! protocol (signed messages on a ZeroMQ PUSH socket: per node a snapshot, a heartbeat and two
//! stats samples, so some VMs are paused or shut off and some carry idle / no-NIC flags), then
//! loads the status page `loads` times in headless Chromium (`tests/browser/statuspage.mjs
//! --measure`, after one warm-up load) and prints the median time from navigation start to the
//! first VM rows in the DOM. Needs `/usr/bin/chromium`, `node` and `npm`; not root.
//! `--hold SECONDS` keeps the master up afterwards (at most an hour) to look at the page.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmwatch_common::protocol::{Body, DomainState, DomainStats, Heartbeat, Snapshot, Stats};
use vmwatch_common::time::now_ms;
use vmwatch_tests::browser;
use vmwatch_tests::product::{temp_dir, wait_for, Master};

/// The stats interval the simulated nodes claim; the two samples are this far apart.
const INTERVAL_S: u64 = 60;

/// A simulated node with its VMs.
struct SimNode {
    node: vmwatch_tests::sim::SimNode,
    id: String,
    vms: Vec<String>,
}

impl SimNode {
    fn new(i: usize, vms: usize, now: u64) -> Result<SimNode> {
        let id = format!("hv-{i:03}");
        Ok(SimNode {
            node: vmwatch_tests::sim::SimNode::new(&id, now - 2 * INTERVAL_S * 1000)?,
            id,
            vms: (0..vms)
                .map(|v| format!("{i:08x}-0000-4000-8000-{v:012x}"))
                .collect(),
        })
    }

    fn message(&mut self, ts: u64, body: Body) -> [Vec<u8>; 4] {
        self.node.message(ts, body)
    }

    /// One VM in ten paused, one in ten shut off, the rest running.
    fn state(v: usize) -> &'static str {
        match v % 10 {
            7 => "paused",
            9 => "shutoff",
            _ => "running",
        }
    }

    fn name(&self, v: usize) -> String {
        format!("{}-vm-{v:02}", self.id)
    }

    fn snapshot(&mut self, ts: u64) -> [Vec<u8>; 4] {
        let domains = (0..self.vms.len())
            .map(|v| DomainState {
                uuid: self.vms[v].clone(),
                name: self.name(v),
                state: Self::state(v).into(),
                reason: "booted".into(),
            })
            .collect();
        let hostname = self.id.clone();
        self.message(
            ts,
            Body::Snapshot(Snapshot {
                domains,
                hostname,
                libvirt_version: "9.0.0".into(),
            }),
        )
    }

    /// Sample `n` (0 or 1): a third of the VMs send nothing (idle net), a quarter write
    /// nothing (idle disk), one in 25 has no interface.
    fn stats(&mut self, ts: u64, n: u64) -> [Vec<u8>; 4] {
        let domains = (0..self.vms.len())
            .filter(|v| Self::state(*v) != "shutoff")
            .map(|v| DomainStats {
                uuid: self.vms[v].clone(),
                name: self.name(v),
                state: Self::state(v).into(),
                tx_pkts: if v % 3 == 0 { 5 } else { 100 + n * 40 },
                wr_reqs: if v % 4 == 0 { 9 } else { 1000 + n * 300 },
                nics: if v % 25 == 24 { 0 } else { 1 },
                disks: 1,
                ..Default::default()
            })
            .collect();
        self.message(
            ts,
            Body::Stats(Stats {
                interval_s: INTERVAL_S,
                domains,
            }),
        )
    }

    fn heartbeat(&mut self, ts: u64) -> [Vec<u8>; 4] {
        let domains = self.vms.len() as u64;
        self.message(
            ts,
            Body::Heartbeat(Heartbeat {
                libvirt: "up".into(),
                domains,
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_s: 2 * INTERVAL_S,
                agent: Default::default(),
            }),
        )
    }
}

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| name.to_string()),
        None => Ok(default),
    }
}

fn accepted(master: &Master, kind: &str) -> f64 {
    master
        .metric(&format!(
            "vmwatch_messages_accepted_total{{kind=\"{kind}\"}}"
        ))
        .unwrap_or(0.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nodes = arg(&args, "--nodes", 200)? as usize;
    let vms = arg(&args, "--vms", 50)? as usize;
    let loads = arg(&args, "--loads", 5)? as u32;
    let hold = arg(&args, "--hold", 0)?.min(3600);
    if nodes == 0 || nodes > 1000 || vms == 0 || loads == 0 {
        bail!("--nodes 1..=1000, --vms ≥ 1 and --loads ≥ 1");
    }
    if !browser::require_browser_env("vmwatch-bench-page") {
        bail!("Chromium, node or npm missing");
    }
    browser::ensure_driver()?;

    let dir = temp_dir("bench-page");
    let master = Master::start(&dir, &[("log_level", "warn")])?;
    let now = now_ms();
    let mut sims = (0..nodes)
        .map(|i| SimNode::new(i, vms, now))
        .collect::<Result<Vec<_>>>()?;
    // Built before the clock starts: the figures are the master's.
    let mut messages = Vec::with_capacity(nodes * 4);
    for sim in &mut sims {
        messages.push(sim.snapshot(now - 2 * INTERVAL_S * 1000 + 1000));
        messages.push(sim.stats(now - INTERVAL_S * 1000, 0));
        messages.push(sim.stats(now, 1));
        messages.push(sim.heartbeat(now));
    }
    let t0 = Instant::now();
    let ctx = zmq::Context::new();
    let socket = vmwatch_tests::sim::curve_push(&ctx)?;
    socket.set_sndhwm(0)?;
    socket.set_linger(5000)?;
    socket.connect(&master.endpoint())?;
    for m in messages {
        socket.send_multipart(m, 0)?;
    }
    wait_for(Duration::from_secs(300), "every message applied", || {
        (accepted(&master, "snapshot") >= nodes as f64
            && accepted(&master, "stats") >= 2.0 * nodes as f64
            && accepted(&master, "heartbeat") >= nodes as f64)
            .then_some(())
    });
    let total = master.get("/api/v1/vms?limit=1")?["total"]
        .as_u64()
        .unwrap_or(0);
    let idle = master.get("/api/v1/vms?limit=1&idle=true")?["total"]
        .as_u64()
        .unwrap_or(0);
    let journal = master
        .metric("vmwatch_journal_entries_total")
        .unwrap_or(0.0);
    eprintln!(
        "setup: {nodes} nodes × {vms} VMs = {total} rows ({idle} with an idle flag, {journal} journal entries) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if total != (nodes * vms) as u64 {
        bail!("the master holds {total} VM rows, expected {}", nodes * vms);
    }

    let (status, body) = master.get_raw("/api/v1/vms?limit=100")?;
    let api_t0 = Instant::now();
    for _ in 0..20 {
        master.get("/api/v1/vms?limit=100")?;
    }
    let api_ms = api_t0.elapsed().as_secs_f64() * 1000.0 / 20.0;
    eprintln!(
        "API: GET /api/v1/vms?limit=100 answers {status} with {} bytes in {api_ms:.1} ms on average",
        body.len()
    );

    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let screenshot = target
        .canonicalize()
        .unwrap_or(target)
        .join("statuspage-10k.png");
    let m = browser::measure(
        &master.url("/"),
        loads,
        Some(&screenshot),
        &dir.join("driver.stderr"),
        Duration::from_secs(300),
    )?;
    println!(
        "status page with {total} VMs ({nodes} nodes × {vms}): first VM rows {} ms after navigation start \
         (median of {loads} loads: {}); whole first refresh (nodes, VMs, journal tail) median {} ms; shown: {}",
        m["median_ms"],
        m["first_rows_ms"],
        m["median_full_refresh_ms"],
        m["shown"]
    );
    println!("screenshot: {}", screenshot.display());

    if hold > 0 {
        println!("holding the master for {hold} s at {}", master.url("/"));
        std::thread::sleep(Duration::from_secs(hold));
    }
    Ok(())
}
