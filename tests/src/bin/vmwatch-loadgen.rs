//! Load generator (a benchmark, not a test): plays N simulated nodes — real protocol, real
//! HMAC, real ZeroMQ — against a real master (the release binary next to this one) and reports
//! what it ingested, with the master's CPU and RSS.
//!
//! ```text
//! vmwatch-loadgen events     [--nodes 100] [--vms 50] [--count 200000]
//! vmwatch-loadgen heartbeats [--nodes 1000] [--count 1000000]
//! vmwatch-loadgen stats      [--nodes 100] [--vms 50] [--count 4000]   (count = messages)
//! vmwatch-loadgen latency    [--nodes 100] [--vms 50] [--rate 1000] [--seconds 10]
//! vmwatch-loadgen inventory  [--nodes 10000] [--vms 50] [--seconds 60]   (then a steady state)
//! vmwatch-loadgen webhook    [--count 10000] [--batch 1]   (batch = panel_batch_max)
//! vmwatch-loadgen bus        [--count 100000]   (a private RabbitMQ broker; needs root)
//! vmwatch-loadgen migrate    [--nodes 2000] [--vms 50]   (SQLite → the private PostgreSQL)
//! ```
//!
//! Messages are built and signed before the clock starts, so the figures are the master's.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmwatch_common::protocol::{Body, DomainEvent, DomainState, DomainStats, Snapshot, Stats};
use vmwatch_common::time::now_ms;
use vmwatch_tests::product::{percentile, rss_kib, temp_dir, wait_for_every, CpuMeter, Master};
use vmwatch_tests::receiver::PanelReceiver;

/// A simulated node with its VMs.
struct SimNode {
    node: vmwatch_tests::sim::SimNode,
    vms: Vec<String>,
}

impl SimNode {
    fn new(i: usize, vms: usize) -> SimNode {
        let node =
            vmwatch_tests::sim::SimNode::new(&format!("load-{i:05}"), now_ms()).expect("node id");
        SimNode {
            node,
            vms: (0..vms)
                .map(|v| format!("{i:08x}-0000-4000-8000-{v:012x}"))
                .collect(),
        }
    }

    fn message(&mut self, body: Body) -> [Vec<u8>; 4] {
        self.node.message_now(body)
    }

    /// A heartbeat, as the node agent builds it.
    fn heartbeat(&mut self) -> [Vec<u8>; 4] {
        let body =
            vmwatch_node::builder::heartbeat(true, self.vms.len() as u64, 1, Default::default());
        self.message(body)
    }

    /// A stats message: every VM running with one interface and one disk, `n` packets and
    /// write requests, sent at `ts` (each of a node's windows a window apart: the master
    /// refuses windows closer than half their interval, `too_frequent`).
    fn stats(&mut self, n: u64, ts: u64) -> [Vec<u8>; 4] {
        let domains = self
            .vms
            .iter()
            .map(|u| DomainStats {
                uuid: u.clone(),
                state: "running".into(),
                tx_pkts: n,
                wr_reqs: n,
                nics: 1,
                disks: 1,
                ..Default::default()
            })
            .collect();
        self.node.message(
            ts,
            Body::Stats(Stats {
                interval_s: 600,
                domains,
            }),
        )
    }

    fn snapshot(&mut self) -> [Vec<u8>; 4] {
        let domains = self
            .vms
            .iter()
            .map(|u| DomainState {
                uuid: u.clone(),
                name: format!("vm-{u}"),
                state: "running".into(),
                reason: "booted".into(),
            })
            .collect();
        self.message(Body::Snapshot(Snapshot {
            domains,
            hostname: self.node.id().to_string(),
            libvirt_version: "9.0.0".into(),
        }))
    }

    fn event(&mut self, n: usize) -> [Vec<u8>; 4] {
        let uuid = self.vms[n % self.vms.len()].clone();
        let (event, detail, state) = if n.is_multiple_of(2) {
            ("suspended", "paused", "paused")
        } else {
            ("resumed", "unpaused", "running")
        };
        self.message(Body::Event(DomainEvent {
            name: format!("vm-{uuid}"),
            uuid,
            event: event.into(),
            detail: detail.into(),
            state: state.into(),
            reason: "user".into(),
            event_ts: now_ms(),
        }))
    }
}

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("missing value")?
            .parse()
            .with_context(|| name.to_string()),
        None => Ok(default),
    }
}

fn push_socket(ctx: &zmq::Context, master: &Master) -> Result<zmq::Socket> {
    let s = vmwatch_tests::sim::curve_push(ctx)?;
    s.set_sndhwm(0)?;
    s.set_linger(5000)?;
    s.connect(&master.endpoint())?;
    Ok(s)
}

fn accepted(master: &Master, kind: &str) -> f64 {
    master
        .metric(&format!(
            "vmwatch_messages_accepted_total{{kind=\"{kind}\"}}"
        ))
        .unwrap_or(0.0)
}

/// Sends pre-built messages from two threads (two sockets), returns when all are handed over.
/// A node's messages always go through the same socket, so their order is kept. The sockets
/// are handed back: keep them until the master has applied everything, since the master pushes
/// back (its receive queue is short) and dropping a socket discards what it still queues.
fn blast(
    ctx: &zmq::Context,
    master: &Master,
    messages: Vec<[Vec<u8>; 4]>,
) -> Result<Vec<zmq::Socket>> {
    let mut parts: [Vec<[Vec<u8>; 4]>; 2] = [Vec::new(), Vec::new()];
    for m in messages {
        let lane = m[1]
            .iter()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(*b as usize))
            % 2;
        parts[lane].push(m);
    }
    let handles: Vec<_> = parts
        .into_iter()
        .map(|part| {
            let s = push_socket(ctx, master);
            std::thread::spawn(move || -> Result<zmq::Socket> {
                let s = s?;
                for m in part {
                    s.send_multipart(m, 0)?;
                }
                Ok(s)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
        })
        .collect()
}

/// Waits until the master has applied `total` messages of `kind`, polling /metrics every
/// 100 ms (a run lasts seconds, so the poll adds under 2 % to the measured time).
fn wait_applied(master: &Master, kind: &str, total: f64) {
    wait_for_every(
        POLL,
        Duration::from_secs(900),
        &format!("{total} {kind} messages applied"),
        || (accepted(master, kind) >= total).then_some(()),
    );
}

/// How often a benchmark polls the master's /metrics.
const POLL: Duration = Duration::from_millis(100);

/// The master's CPU since a start point, and its RSS now.
struct Usage(CpuMeter);

impl Usage {
    fn start(master: &Master) -> Result<Usage> {
        Ok(Usage(CpuMeter::start(master.pid().context("master pid")?)))
    }

    fn cpu_percent(&self) -> f64 {
        self.0.percent()
    }

    fn report(&self) -> String {
        format!(
            "master CPU {:.1} % of one core over {:.1} s, RSS {} MiB",
            self.0.percent(),
            self.0.elapsed().as_secs_f64(),
            rss_kib(self.0.pid).unwrap_or(0) / 1024
        )
    }
}

fn setup(ctx: &zmq::Context, master: &Master, nodes: usize, vms: usize) -> Result<Vec<SimNode>> {
    let mut sims: Vec<SimNode> = (0..nodes).map(|i| SimNode::new(i, vms)).collect();
    let snaps: Vec<_> = sims.iter_mut().map(SimNode::snapshot).collect();
    let t0 = Instant::now();
    let _senders = blast(ctx, master, snaps)?;
    wait_for_every(
        POLL,
        Duration::from_secs(600),
        "all snapshots applied",
        || (accepted(master, "snapshot") >= nodes as f64).then_some(()),
    );
    eprintln!(
        "setup: {nodes} nodes × {vms} VMs applied in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(sims)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    let dir = temp_dir("loadgen");
    let ctx = zmq::Context::new();
    match mode.as_str() {
        "events" | "heartbeats" | "stats" => {
            let default_nodes = if mode == "heartbeats" { 1000 } else { 100 };
            let nodes = arg(&args, "--nodes", default_nodes)? as usize;
            let vms = arg(&args, "--vms", 50)? as usize;
            let count = arg(&args, "--count", match mode.as_str() { "stats" => 4000, "heartbeats" => 1_000_000, _ => 200_000 })? as usize;
            // Stats: each node's windows are 600 s apart in node time, the oldest up to a day
            // back, so every message is a window of its own (none refused as too_frequent).
            let master = Master::start(&dir, &[("log_level", "warn"), ("max_message_age", "172800")])?;
            let mut sims = setup(&ctx, &master, nodes, vms)?;
            let mut messages = Vec::with_capacity(count);
            let windows = count.div_ceil(nodes) as u64;
            let first_window = now_ms().saturating_sub(windows * 600_000);
            for n in 0..count {
                let sim = &mut sims[n % nodes];
                messages.push(match mode.as_str() {
                    "events" => sim.event(n / nodes),
                    "heartbeats" => sim.heartbeat(),
                    _ => sim.stats(n as u64, first_window + (n / nodes) as u64 * 600_000),
                });
            }
            let kind = match mode.as_str() {
                "events" => "event",
                "heartbeats" => "heartbeat",
                _ => "stats",
            };
            // The reference sends this very message (its 4 frames, each encrypted by CURVE).
            let sample = messages.first().cloned().context("no message")?;
            let before = accepted(&master, kind);
            let commits_before = master.metric("vmwatch_db_commit_seconds_count").unwrap_or(0.0);
            let commit_secs_before = master.metric("vmwatch_db_commit_seconds_sum").unwrap_or(0.0);
            let usage = Usage::start(&master)?;
            let t0 = Instant::now();
            let _senders = blast(&ctx, &master, messages)?;
            wait_applied(&master, kind, before + count as f64);
            let secs = t0.elapsed().as_secs_f64();
            let commits = master.metric("vmwatch_db_commit_seconds_count").unwrap_or(0.0) - commits_before;
            let commit_secs = master.metric("vmwatch_db_commit_seconds_sum").unwrap_or(0.0) - commit_secs_before;
            println!(
                "{mode}: {commits:.0} commits, {:.0} messages per commit on average, {commit_secs:.2} s in commits ({:.0} % of the run)",
                count as f64 / commits.max(1.0),
                commit_secs / secs * 100.0
            );
            let per_msg = if mode == "stats" { vms } else { 1 };
            println!(
                "{mode}: {count} messages ({} {}) from {nodes} nodes ingested and committed in {secs:.2} s = {:.0} messages/s ({:.0} {}/s); {}",
                count * per_msg,
                if mode == "stats" { "VM samples" } else { "messages" },
                count as f64 / secs,
                (count * per_msg) as f64 / secs,
                if mode == "stats" { "samples" } else { "messages" },
                usage.report()
            );
            if mode == "heartbeats" {
                // The floor in the same run: raw libzmq PUSH→PULL with CURVE over one connection
                // (the product's load comes over 2), carrying the same 4-frame message (each
                // frame encrypted on its own, as the product's are), and, as the issue defines
                // it, one frame of the same size.
                let size: usize = sample.iter().map(Vec::len).sum();
                let same = vmwatch_tests::reference::zmq_curve(count, &sample)?;
                let flat = vmwatch_tests::reference::zmq_curve(count, &[sample.concat()])?;
                let product = count as f64 / secs;
                println!(
                    "heartbeats reference: raw libzmq PUSH→PULL with CURVE, one connection: the same 4-frame {size}-byte message {same:.0} messages/s (product/reference = {:.2}); one {size}-byte frame {flat:.0} messages/s (product/reference = {:.2})",
                    product / same,
                    product / flat
                );
            }
            if mode == "stats" && vmwatch_tests::pg::selected() {
                // Only events have a raw PostgreSQL reference (SPEC §12); a SQLite one would be
                // no floor for this master.
                println!("stats reference: none on PostgreSQL (compare with the previous master through VMWATCH_BIN_DIR)");
            } else if mode == "stats" {
                // The floor in the same run: raw SQLite writing the same VM rows.
                let reference = vmwatch_tests::reference::sqlite_stats(&dir, nodes, vms, count, 64)?;
                let product = (count * vms) as f64 / secs;
                println!(
                    "stats reference: raw SQLite writing the same node and VM rows (usage included) with the master's statements and settings, 64 messages per transaction: {reference:.0} samples/s; product/reference = {:.2}",
                    product / reference
                );
            }
            if mode == "events" && vmwatch_tests::pg::selected() {
                // The floor in the same run: raw PostgreSQL (the postgres crate), the master's
                // statements on its schema, the same rows and batches.
                let reference = vmwatch_tests::reference::postgres_events(nodes, vms, count, vmwatch_master::core::MAX_BATCH)?;
                let product = count as f64 / secs;
                println!(
                    "events reference: raw PostgreSQL, same schema, statements and rows, batches of {}: {reference:.0} events/s; product/reference = {:.2}",
                    vmwatch_master::core::MAX_BATCH,
                    product / reference
                );
            } else if mode == "events" {
                // The floor in the same run: raw SQLite, the same rows, schema and settings.
                let reference = vmwatch_tests::reference::sqlite_events(&dir, nodes, vms, count, vmwatch_master::core::MAX_BATCH)?;
                let product = count as f64 / secs;
                println!(
                    "events reference: raw SQLite, same schema, rows and settings, batches of {}: {reference:.0} events/s; product/reference = {:.2}",
                    vmwatch_master::core::MAX_BATCH,
                    product / reference
                );
            }
            let rejected: f64 = vmwatch_common::protocol::Reject::ALL
                .iter()
                .map(|r| master.metric(&format!("vmwatch_messages_rejected_total{{reason=\"{}\"}}", r.as_str())).unwrap_or(0.0))
                .sum();
            if rejected > 0.0 {
                bail!("{rejected} messages rejected");
            }
        }
        "latency" => {
            let nodes = arg(&args, "--nodes", 100)? as usize;
            let vms = arg(&args, "--vms", 50)? as usize;
            let rate = arg(&args, "--rate", 1000)?;
            let seconds = arg(&args, "--seconds", 10)?;
            let master = Master::start(&dir, &[("log_level", "warn")])?;
            let mut sims = setup(&ctx, &master, nodes, vms)?;
            let socket = push_socket(&ctx, &master)?;
            // A node's connection is long-lived: the CURVE handshake is not what is measured
            // (left in, it was the first 60 events' 10-67 ms). One heartbeat through first.
            let warm = accepted(&master, "heartbeat");
            socket.send_multipart(sims[0].heartbeat(), 0)?;
            wait_applied(&master, "heartbeat", warm + 1.0);
            let total = (rate * seconds) as usize;
            // A reader following the journal as a panel would (GET /api/v1/events?after=):
            // an entry is visible when a poll returns it; the node put its send time in
            // `event_ts`. Every event is measured, so the percentiles are exact (to the poll's
            // own period, printed beside them).
            let base = master.url("/api/v1/events");
            // The reader starts at the journal's end: catching up on the setup's 5,000 entries
            // (pages of 1,000 taking ~15 ms each) while measuring was the first events' tail.
            let mut after = 0u64;
            loop {
                let page = master.get(&format!("/api/v1/events?limit=1000&after={after}"))?;
                let last = page["last_id"].as_u64().unwrap_or(after);
                if last == after {
                    break;
                }
                after = last;
            }
            let reader = std::thread::spawn(move || -> Result<(Vec<u64>, Vec<u64>)> {
                let (mut cursor, mut lat, mut polls) = (after, Vec::with_capacity(total), Vec::new());
                let deadline = Instant::now() + Duration::from_secs(seconds + 60);
                while lat.len() < total && Instant::now() < deadline {
                    let t = Instant::now();
                    let v: serde_json::Value = ureq::get(&format!("{base}?type=lifecycle&limit=1000&after={cursor}")).call()?.into_json()?;
                    let seen = now_ms();
                    polls.push(t.elapsed().as_micros() as u64);
                    for e in v["events"].as_array().into_iter().flatten() {
                        lat.push(seen.saturating_sub(e["event_ts"].as_u64().unwrap_or(seen)));
                    }
                    cursor = v["last_id"].as_u64().unwrap_or(cursor);
                }
                Ok((lat, polls))
            });
            let t0 = Instant::now();
            for n in 0..total {
                let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let m = sims[n % nodes].event(n / nodes);
                socket.send_multipart(m, 0)?;
            }
            let (mut lat, mut polls) = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
            if lat.len() < total {
                bail!("only {} of {total} events became visible", lat.len());
            }
            lat.sort_unstable();
            polls.sort_unstable();
            println!(
                "latency: {total} events at {rate}/s from {nodes} nodes: node send → visible in GET /api/v1/events: p50 {} ms, p99 {} ms, max {} ms (exact, every event; one poll takes p50 {} µs, p99 {} µs)",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat[lat.len() - 1],
                percentile(&polls, 0.5),
                percentile(&polls, 0.99)
            );
            // The floor in the same run: raw SQLite committing one event's rows durably, one
            // transaction per event, at the same pace.
            let floor = vmwatch_tests::reference::sqlite_commit_latency(&dir, 1000, Duration::from_secs_f64(1.0 / rate as f64))?;
            println!(
                "latency reference: raw SQLite, one event's node row, VM row and journal entry per durable commit, 1000 at {rate}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(&floor, 0.5) as f64 / 1000.0,
                percentile(&floor, 0.99) as f64 / 1000.0,
                floor[floor.len() - 1] as f64 / 1000.0
            );
        }
        "inventory" => {
            let nodes = arg(&args, "--nodes", 10_000)? as usize;
            let vms = arg(&args, "--vms", 50)? as usize;
            let seconds = arg(&args, "--seconds", 60)?;
            // The setup sends snapshots only: a node whose snapshot is applied early must not
            // time out before the steady state's first heartbeat reaches it (a setup on
            // PostgreSQL takes longer than the default 90 s; a real fleet heartbeats meanwhile).
            let master = Master::start(&dir, &[("log_level", "warn"), ("node_timeout", "600")])?;
            let usage = Usage::start(&master)?;
            let mut sims = setup(&ctx, &master, nodes, vms)?;
            let total = master.get("/api/v1/vms?limit=1")?["total"].as_u64().unwrap_or(0);
            println!("inventory: {nodes} nodes × {vms} VMs = {total} rows held; setup {}", usage.report());
            // Steady state: every node's heartbeat every 30 s and stats every 600 s, spread
            // evenly, as a fleet sends them.
            let socket = push_socket(&ctx, &master)?;
            let per_s_beats = nodes as f64 / 30.0;
            let per_s_stats = nodes as f64 / 600.0;
            let usage = Usage::start(&master)?;
            let server0 = vmwatch_tests::reference::postgres_server_cpu();
            let t0 = Instant::now();
            let (mut beats, mut stat_msgs) = (0usize, 0usize);
            while t0.elapsed() < Duration::from_secs(seconds) {
                let at = t0.elapsed().as_secs_f64();
                while (beats as f64) < at * per_s_beats {
                    socket.send_multipart(sims[beats % nodes].heartbeat(), 0)?;
                    beats += 1;
                }
                while (stat_msgs as f64) < at * per_s_stats {
                    let i = (stat_msgs * 7) % nodes;
                    socket.send_multipart(sims[i].stats(stat_msgs as u64, now_ms()), 0)?;
                    stat_msgs += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            println!(
                "steady: {nodes} nodes × {vms} VMs, a heartbeat per node every 30 s ({beats} sent) and stats every 600 s ({stat_msgs} sent) over {seconds} s; {}",
                usage.report()
            );
            let product_cpu = usage.cpu_percent();
            // Saturating: a postgres process of another test that exits meanwhile takes its
            // CPU time out of the sum (it panicked a run here once).
            let server_cpu = vmwatch_tests::reference::postgres_server_cpu().saturating_sub(server0).as_secs_f64() * 100.0 / t0.elapsed().as_secs_f64();
            drop(master);
            if vmwatch_tests::pg::selected() {
                // The floor in the same run: raw PostgreSQL writing the same rows at the same
                // rates; the server's processes measured beside each.
                let (reference, reference_server) = vmwatch_tests::reference::postgres_steady(nodes, vms, seconds, per_s_beats, per_s_stats)?;
                println!(
                    "steady on PostgreSQL: master CPU {product_cpu:.2} %, PostgreSQL server CPU {server_cpu:.2} % of one core"
                );
                // On SQLite the reference's CPU holds the database's own work; here that is the
                // server's, so the like-for-like figure is the two together.
                println!(
                    "steady reference: raw PostgreSQL writing the same node and VM rows at the same rates with the master's statements, one transaction every 10 ms: client CPU {reference:.2} %, server CPU {reference_server:.2} % of one core; master/client = {:.1}, server product/reference = {:.2}, (master + server)/(client + server) = {:.2}",
                    product_cpu / reference,
                    server_cpu / reference_server,
                    (product_cpu + server_cpu) / (reference + reference_server)
                );
            } else {
                // The floor in the same run: raw SQLite writing the same rows at the same rates.
                let reference = vmwatch_tests::reference::sqlite_steady(&dir, nodes, vms, seconds, per_s_beats, per_s_stats)?;
                println!(
                    "steady reference: raw SQLite writing the same node and VM rows at the same rates, one transaction every 10 ms: CPU {reference:.2} % of one core; product/reference = {:.1}",
                    product_cpu / reference
                );
            }
        }
        "webhook" => {
            let count = arg(&args, "--count", 10_000)? as usize;
            let batch = arg(&args, "--batch", 1)?.to_string();
            let mut panel = PanelReceiver::start(0, b"panel-key-for-the-loadgen-000")?;
            let url = panel.url();
            let master = Master::start(&dir, &[("log_level", "warn"), ("panel_url", &url), ("panel_secret", "panel-key-for-the-loadgen-000"), ("panel_batch_max", &batch)])?;
            let mut sims = setup(&ctx, &master, 10, 50)?;
            // The setup's own journal entries are delivered first, so they do not count as lag.
            wait_for_every(POLL, Duration::from_secs(120), "the setup's entries delivered", || {
                master.metric("vmwatch_outbox_depth").ok().filter(|d| *d == 0.0)
            });
            // Latency: 200 events paced at 50/s with the panel up.
            let socket = push_socket(&ctx, &master)?;
            let start_len = panel.received().len();
            for n in 0..200 {
                socket.send_multipart(sims[n % 10].event(n / 10), 0)?;
                std::thread::sleep(Duration::from_millis(20));
            }
            let want = start_len + 200;
            wait_for_every(POLL, Duration::from_secs(60), "paced deliveries", || (panel.received().len() >= want).then_some(()));
            let mut lat: Vec<u64> = panel.received()[start_len..]
                .iter()
                .filter_map(|d| d.body["received_at"].as_u64().map(|r| d.at_ms.saturating_sub(r)))
                .collect();
            lat.sort_unstable();
            println!(
                "webhook latency (journal entry → panel received, 200 entries at 50/s): median {} ms, p99 {} ms, max {} ms",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat[lat.len() - 1]
            );
            // Drain: a backlog built while the panel is down.
            panel.stop();
            let messages: Vec<_> = (0..count).map(|n| sims[n % 10].event(n / 10)).collect();
            let _senders = blast(&ctx, &master, messages)?;
            wait_for_every(POLL, Duration::from_secs(300), "the backlog in the outbox", || {
                master.metric("vmwatch_outbox_depth").ok().filter(|d| *d >= count as f64)
            });
            let depth = master.metric("vmwatch_outbox_depth")?;
            let before: HashSet<i64> = panel.received().iter().map(|d| d.event_id).collect();
            let usage = Usage::start(&master)?;
            let t0 = Instant::now();
            panel.restart()?;
            wait_for_every(POLL, Duration::from_secs(600), "the outbox drained", || {
                master.metric("vmwatch_outbox_depth").ok().filter(|d| *d == 0.0)
            });
            let secs = t0.elapsed().as_secs_f64();
            let new = panel.received().iter().filter(|d| !before.contains(&d.event_id)).count();
            println!(
                "webhook drain: {depth:.0} entries backlog delivered in {secs:.2} s = {:.0} entries/s ({new} new ids received, one POST at a time to keep the order, panel_batch_max={batch}); {}",
                depth / secs,
                usage.report()
            );
            // The floor in the same run: raw signed POSTs of one entry each, one at a time on
            // one keep-alive connection, to the same receiver.
            let sample = master.get("/api/v1/events?limit=1")?;
            let body = serde_json::to_vec(&sample["events"][0])?;
            let reference = vmwatch_tests::reference::http_posts(&url, b"panel-key-for-the-loadgen-000", count, &body)?;
            println!(
                "webhook reference: raw HTTP (ureq), {count} signed POSTs of one {} B entry, one at a time on one keep-alive connection to the same receiver: {reference:.0} POSTs/s; product entries/s ÷ reference POSTs/s = {:.2}",
                body.len(),
                (depth / secs) / reference
            );
        }
        "migrate" => {
            // `vmwatch-master migrate` of the install a fleet's snapshots leave on SQLite (a node
            // and a journal entry per VM row, rows per VM) into a database of the private
            // PostgreSQL cluster.
            if vmwatch_tests::pg::selected() {
                bail!("migrate starts on SQLite: run it without VMWATCH_TEST_DATABASE");
            }
            let nodes = arg(&args, "--nodes", 2000)? as usize;
            let vms = arg(&args, "--vms", 50)? as usize;
            let mut master = Master::start(&dir, &[("log_level", "warn"), ("node_timeout", "600")])?;
            setup(&ctx, &master, nodes, vms)?;
            master.stop()?;
            let cluster = vmwatch_tests::pg::cluster()?;
            let url = cluster.create_database("migrate")?;
            let pw = cluster.password_file.display().to_string();
            let t0 = Instant::now();
            let (code, out, err) = master.command(&["migrate", "--to", &url, "--password-file", &pw])?;
            let secs = t0.elapsed().as_secs_f64();
            if code != 0 {
                bail!("migrate exited {code}: {err}");
            }
            print!("{out}");
            let rows: u64 = out
                .lines()
                .filter_map(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
                .sum();
            println!("migrate: {nodes} nodes × {vms} VMs from SQLite to PostgreSQL in {secs:.1} s, {rows} rows = {:.0} rows/s", rows as f64 / secs);
        }
        "bus" => bus(&ctx, &dir, arg(&args, "--count", 100_000)? as usize)?,
        _ => bail!("usage: vmwatch-loadgen events|heartbeats|stats|latency|inventory|webhook|bus|migrate [--nodes N] [--vms V] [--count M]"),
    }
    Ok(())
}

/// The event bus: latency with the broker keeping up, then a backlog built while the broker is
/// frozen, drained once it goes on; beside raw AMQP publishing to the same broker.
fn bus(ctx: &zmq::Context, dir: &std::path::Path, count: usize) -> Result<()> {
    use vmwatch_tests::broker::{Broker, BusQueue};
    let t0 = Instant::now();
    let broker = Broker::start(&dir.join("broker"))?;
    println!(
        "bus: a private RabbitMQ broker accepted AMQP {:.1} s after it was started",
        t0.elapsed().as_secs_f64()
    );
    let url = broker.url();
    let queue = BusQueue::bind(&url, "vmwatch", "bench", "vmwatch.#")?;
    let master = Master::start(dir, &[("log_level", "warn"), ("bus_url", &url)])?;
    let mut sims = setup(ctx, &master, 10, 50)?;
    wait_for_every(
        POLL,
        Duration::from_secs(60),
        "the setup's entries confirmed",
        || {
            (master.metric("vmwatch_bus_lag").ok()? == 0.0
                && master.metric("vmwatch_bus_up").ok()? == 1.0)
                .then_some(())
        },
    );
    queue.take()?;
    // Latency: 200 events paced at 50/s, journal entry → the consumer's basic_get (polled
    // every millisecond), and publish → confirm from the master's histogram.
    let socket = push_socket(ctx, &master)?;
    let before = master.metric("vmwatch_bus_published_total")?;
    let confirm_before = histogram(&master, "vmwatch_bus_confirm_seconds")?;
    let mut lat = Vec::new();
    for n in 0..200 {
        let sent = Instant::now();
        socket.send_multipart(sims[n % 10].event(n / 10), 0)?;
        let got = loop {
            let got = queue.take()?;
            if !got.is_empty() || sent.elapsed() > Duration::from_secs(10) {
                break got;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let at = now_ms();
        lat.extend(
            got.iter()
                .filter_map(|m| m.body["received_at"].as_u64())
                .map(|r| at.saturating_sub(r)),
        );
        std::thread::sleep(Duration::from_millis(20).saturating_sub(sent.elapsed()));
    }
    wait_for_every(
        POLL,
        Duration::from_secs(60),
        "paced entries confirmed",
        || (master.metric("vmwatch_bus_published_total").ok()? >= before + 200.0).then_some(()),
    );
    lat.sort_unstable();
    // Only the paced entries: the setup's 501 went as one window.
    let confirm_after = histogram(&master, "vmwatch_bus_confirm_seconds")?;
    let paced: Vec<(f64, f64)> = confirm_after
        .iter()
        .zip(&confirm_before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let confirm = [percentile_of(&paced, 0.5), percentile_of(&paced, 0.99)];
    let sample = master.get("/api/v1/events?limit=1")?;
    let body = serde_json::to_vec(&sample["events"][0])?;
    let floor = vmwatch_tests::reference::amqp_confirm_latency(
        &url,
        "vmwatch",
        200,
        &body,
        Duration::from_millis(20),
    )?;
    queue.take()?;
    println!(
        "bus latency, 200 entries at 50/s: journal entry → consumer median {} ms, p99 {} ms; publish → confirm (the master's histogram, interpolated) median {:.1} ms, p99 {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        confirm[0] * 1000.0,
        confirm[1] * 1000.0
    );
    println!(
        "bus latency reference: raw AMQP (lapin), the same broker, queue and entry size, one persistent message at a time every 20 ms, publish → confirm: median {:.1} ms, p99 {:.1} ms",
        percentile(&floor, 0.5),
        percentile(&floor, 0.99)
    );

    // Backlog: the broker frozen (its connection held, nothing confirmed) while `count` events
    // are journaled; the drain is timed from the moment it goes on.
    broker.pause()?;
    let messages: Vec<_> = (0..count).map(|n| sims[n % 10].event(n / 10)).collect();
    let _senders = blast(ctx, &master, messages)?;
    wait_for_every(
        POLL,
        Duration::from_secs(300),
        "the backlog journaled",
        || {
            master
                .metric("vmwatch_bus_lag")
                .ok()
                .filter(|l| *l >= count as f64)
        },
    );
    let lag = master.metric("vmwatch_bus_lag")?;
    let usage = Usage::start(&master)?;
    let t1 = Instant::now();
    broker.resume()?;
    wait_for_every(
        POLL,
        Duration::from_secs(600),
        "the backlog confirmed",
        || master.metric("vmwatch_bus_lag").ok().filter(|l| *l == 0.0),
    );
    let secs = t1.elapsed().as_secs_f64();
    let product = lag / secs;
    println!("bus drain: {lag:.0} entries backlog published and confirmed in {secs:.2} s = {product:.0} entries/s; {}", usage.report());
    // The reference: raw lapin, the same broker, exchange and queue, an entry of the same size.
    let reference = vmwatch_tests::reference::amqp_publish(
        &url,
        "vmwatch",
        count,
        &body,
        vmwatch_master::BUS_WINDOW as usize,
    )?;
    println!(
        "bus reference: raw AMQP (lapin) to the same broker and queue, {} B persistent messages, {} per confirm window: {reference:.0} messages/s; product/reference = {:.2}",
        body.len(),
        vmwatch_master::BUS_WINDOW,
        product / reference
    );
    Ok(())
}

/// The cumulative buckets `(le, count)` of an OpenMetrics histogram.
fn histogram(master: &Master, name: &str) -> Result<Vec<(f64, f64)>> {
    let text = master.metrics()?;
    let mut buckets = Vec::new();
    let prefix = format!("{name}_bucket{{le=\"");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(&prefix) {
            let (le, count) = rest.split_once("\"} ").context("bucket line")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            buckets.push((le, count.trim().parse()?));
        }
    }
    Ok(buckets)
}

/// A percentile of cumulative buckets, interpolated linearly inside its bucket.
fn percentile_of(buckets: &[(f64, f64)], p: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    let rank = p * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let share = if n > lower.1 {
                (rank - lower.1) / (n - lower.1)
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * share;
        }
        lower = (le, n);
    }
    lower.0
}
