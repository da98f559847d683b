//! What a CURVE handshake costs with per-node keys (SPEC §10: the ZAP handler maps the client
//! key to an enrolled node) beside the old fleet key (one key compared), against one real
//! master in the same run: wall time from `connect` to the client's `HANDSHAKE_SUCCEEDED`, and
//! the master's CPU per handshake.
//!
//! usage: vmwatch-bench-handshake [HANDSHAKES] [ENROLLED]   (defaults 400 and 100)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmwatch_common::keys;
use vmwatch_common::protocol::NodeId;
use vmwatch_tests::product::{temp_dir, CpuMeter, Master, SECRET};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args
        .first()
        .map_or(Ok(400), |a| a.parse())
        .context("HANDSHAKES")?;
    let enrolled: usize = args
        .get(1)
        .map_or(Ok(100), |a| a.parse())
        .context("ENROLLED")?;
    let dir = temp_dir("bench-handshake");
    let master = Master::start(
        &dir,
        &[("log_level", "warn"), ("allow_fleet_transport", "yes")],
    )?;
    let ids: Vec<String> = (0..enrolled).map(|i| format!("hs-{i:05}")).collect();
    for id in &ids {
        master.enroll(id);
    }
    // The master follows CLI enrollments within its 0.2 s poll.
    vmwatch_tests::product::wait_for(Duration::from_secs(5), "the enrollments seen", || {
        (master.metric("vmwatch_enrolled_nodes").ok()? >= enrolled as f64).then_some(())
    });
    let pid = master.pid().context("master pid")?;
    let server = keys::server_keypair(SECRET.as_bytes()).public;
    let fleet = keys::transport_keypair(SECRET.as_bytes());
    let node_keys: Vec<keys::CurveKeyPair> = ids
        .iter()
        .map(|id| {
            let node = NodeId::parse(id).expect("valid id");
            keys::node_curve_keypair(SECRET.as_bytes(), &node)
        })
        .collect();
    let ctx = zmq::Context::new();
    let run = |label: &str, key_of: &dyn Fn(usize) -> keys::CurveKeyPair| -> Result<()> {
        let cpu = CpuMeter::start(pid);
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let pair = key_of(i);
            let s = ctx.socket(zmq::PUSH)?;
            s.set_linger(0)?;
            s.set_curve_serverkey(&server)?;
            s.set_curve_publickey(&pair.public)?;
            s.set_curve_secretkey(&pair.secret)?;
            let endpoint = format!("inproc://hs-monitor-{label}-{i}");
            s.monitor(
                &endpoint,
                zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32
                    | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32,
            )?;
            let mon = ctx.socket(zmq::PAIR)?;
            mon.connect(&endpoint)?;
            mon.set_rcvtimeo(5000)?;
            let t0 = Instant::now();
            s.connect(&master.endpoint())?;
            let ev = mon
                .recv_multipart(0)
                .context("no handshake event within 5 s")?;
            let code = u16::from_ne_bytes([ev[0][0], ev[0][1]]);
            if code != zmq::SocketEvent::HANDSHAKE_SUCCEEDED as u16 {
                bail!("{label}: handshake {i} refused (event {code})");
            }
            times.push(t0.elapsed());
        }
        let cpu_ms = cpu.percent() / 100.0 * cpu.elapsed().as_secs_f64() * 1000.0;
        times.sort();
        let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
        println!(
            "{label}: {n} handshakes, connect → HANDSHAKE_SUCCEEDED median {:.3} ms, p99 {:.3} ms; master CPU {:.3} ms per handshake",
            pct(0.5).as_secs_f64() * 1000.0,
            pct(0.99).as_secs_f64() * 1000.0,
            cpu_ms / n as f64
        );
        Ok(())
    };
    run("fleet key (reference, same run)", &|_| fleet.clone())?;
    run(&format!("per-node keys ({enrolled} enrolled)"), &|i| {
        node_keys[i % node_keys.len()].clone()
    })?;
    Ok(())
}
