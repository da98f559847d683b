//! Benchmark (not a test): how long the node's stats collection takes for N guests.
//!
//! `cargo run --release -p vmwatch-tests --bin vmwatch-bench-stats [-- GUESTS]` as root.
//! Starts a private libvirtd with GUESTS idle guests (default 20), runs the real node (release
//! binary) with `stats_interval=1` and debug logging, and reads the duration of each
//! collection (`virConnectGetAllDomainStats` with the state, cpu, interface and block groups)
//! from the node's own log line `stats collected … took_ms=N`.

use std::time::Duration;

use anyhow::{Context, Result};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node};

fn main() -> Result<()> {
    let guests: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("GUESTS")?
        .unwrap_or(20);
    let lv = PrivateLibvirtd::start("benchstats")?;
    for i in 0..guests {
        lv.start_guest(&format!("bench-{i:02}"), GuestKind::Idle)?;
    }
    let dir = temp_dir("benchstats");
    let master = Master::start(&dir, &[("log_level", "warn")])?;
    let node = Node::start(
        &dir,
        "benchstats",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "1")],
    )?;
    let took = || -> Vec<u64> {
        node.log_text()
            .lines()
            .filter(|l| l.contains("stats collected") && l.contains(&format!("domains={guests}")))
            .filter_map(|l| {
                l.split("took_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    let mut samples = wait_for(Duration::from_secs(60), "15 collections", || {
        Some(took()).filter(|t| t.len() >= 15)
    });
    samples.remove(0); // the first one also opens the connection
    samples.sort_unstable();
    println!(
        "stats collection for {guests} guests ({} runs): median {} ms, min {} ms, max {} ms",
        samples.len(),
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1]
    );
    Ok(())
}
