//! Activity history at fleet scale (a benchmark, not a test): the product's layout (one row
//! per VM, node and day, points packed and appended; written by the master's own
//! `Store::commit`) beside the obvious one (one row per point, `WITHOUT ROWID`, the same
//! settings), in the same run.
//!
//! ```text
//! vmwatch-bench-activity [VMS] [WINDOWS]      (default 500000 VMs, 6 windows)
//! ```
//!
//! For each layout: insert cost (points/s) of `WINDOWS` windows of every VM, committed in
//! batches of 4096 points as the core commits a busy second; bytes on disk per point; the
//! read of one VM's day. Then the end of a day: 10 % of the VMs with 143 windows already, one
//! more appended, and the bytes per point of a full day.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use rusqlite::{params, Connection};
use vmwatch_master::activity::{Point, DAY_MS};
use vmwatch_master::rules::Effect;
use vmwatch_master::store::{Reader, Store};
use vmwatch_tests::product::temp_dir;

const BATCH: usize = 4096;
const DAY: u64 = 20_000;

/// A realistic mix: half the VMs quiet, the rest with traffic and writes.
fn point(vm: usize, window: u64) -> Point {
    let busy = vm.is_multiple_of(2);
    let n = (vm as u64 * 7919 + window * 104_729) % 5000;
    let v = |scale: u64| Some(if busy { n * scale + 1 } else { 0 });
    Point {
        ts: DAY * DAY_MS + (window + 1) * 600_000,
        window_ms: 600_000,
        deltas: [
            v(1),
            v(2),
            v(90),
            v(150),
            v(1),
            v(3),
            v(4096),
            v(8192),
            v(1),
        ],
        idle_net: !busy,
        idle_disk: !busy,
    }
}

fn uuid(vm: usize) -> String {
    format!("{vm:08x}-0000-4000-8000-{:012x}", vm % 50)
}

fn node(vm: usize) -> String {
    format!("hv-{:05}", vm / 50)
}

fn file_size(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum()
}

/// The product: `Store::commit` of `Effect::Activity`, as the core writes stats.
fn product(path: &Path, vms: usize, windows: std::ops::Range<u64>, only: usize) -> Result<f64> {
    let mut store = Store::open(path)?;
    let effects: Vec<(usize, u64)> = windows
        .flat_map(|w| (0..vms).step_by(only).map(move |vm| (vm, w)))
        .collect();
    let t0 = Instant::now();
    for chunk in effects.chunks(BATCH) {
        let batch: Vec<Effect> = chunk
            .iter()
            .map(|&(vm, w)| Effect::Activity {
                node_id: node(vm),
                uuid: uuid(vm),
                point: point(vm, w),
            })
            .collect();
        store.commit(&batch)?;
    }
    Ok(effects.len() as f64 / t0.elapsed().as_secs_f64())
}

/// The reference: one row per point.
fn rows(path: &Path, vms: usize, windows: std::ops::Range<u64>, only: usize) -> Result<f64> {
    let mut conn = Connection::open(path)?;
    vmwatch_master::store::tune_writer(&conn)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS points (uuid TEXT NOT NULL, node_id TEXT NOT NULL, \
         ts INTEGER NOT NULL, window_s INTEGER NOT NULL, tx_pkts INTEGER, rx_pkts INTEGER, \
         tx_bytes INTEGER, rx_bytes INTEGER, rd_reqs INTEGER, wr_reqs INTEGER, rd_bytes INTEGER, \
         wr_bytes INTEGER, cpu_ms INTEGER, flags INTEGER NOT NULL, \
         PRIMARY KEY (uuid, node_id, ts)) WITHOUT ROWID",
    )?;
    let effects: Vec<(usize, u64)> = windows
        .flat_map(|w| (0..vms).step_by(only).map(move |vm| (vm, w)))
        .collect();
    let t0 = Instant::now();
    for chunk in effects.chunks(BATCH) {
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO points VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?;
            for &(vm, w) in chunk {
                let p = point(vm, w);
                let d = p.deltas.map(|d| d.map(|v| v as i64));
                stmt.execute(params![
                    uuid(vm),
                    node(vm),
                    (p.ts / 1000) as i64,
                    (p.window_ms / 1000) as i64,
                    d[0],
                    d[1],
                    d[2],
                    d[3],
                    d[4],
                    d[5],
                    d[6],
                    d[7],
                    d[8],
                    i64::from(p.idle_net) | i64::from(p.idle_disk) << 1
                ])?;
            }
        }
        tx.commit()?;
    }
    Ok(effects.len() as f64 / t0.elapsed().as_secs_f64())
}

fn checkpoint(path: &Path) -> Result<()> {
    Connection::open(path)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let vms = args.first().copied().unwrap_or(500_000);
    let windows = args.get(1).copied().unwrap_or(6) as u64;
    let dir = temp_dir("bench-activity");
    let points = vms as u64 * windows;

    let packed = dir.join("packed.db");
    drop(Store::open(&packed)?);
    checkpoint(&packed)?;
    let empty = file_size(&packed);
    let rate = product(&packed, vms, 0..windows, 1)?;
    checkpoint(&packed)?;
    let packed_bytes = (file_size(&packed) - empty) as f64 / points as f64;

    let plain = dir.join("rows.db");
    let reference = rows(&plain, vms, 0..windows, 1)?;
    checkpoint(&plain)?;
    let plain_bytes = file_size(&plain) as f64 / points as f64;
    println!(
        "activity insert, {vms} VMs × {windows} windows ({points} points, batches of {BATCH}): packed day rows (the product, Store::commit) {rate:.0} points/s, {packed_bytes:.1} B/point on disk; one row per point (reference, same settings) {reference:.0} points/s, {plain_bytes:.1} B/point; insert ratio {:.2}, size ratio {:.2}",
        rate / reference,
        packed_bytes / plain_bytes
    );

    // Reading one VM's day, 1000 VMs spread over the fleet.
    let mut reader = Reader::open(&packed)?;
    let t0 = Instant::now();
    let mut read = 0;
    for i in 0..1000 {
        let vm = i * (vms / 1000).max(1);
        read += reader
            .activity(&uuid(vm), None, DAY, DAY)?
            .iter()
            .map(|(_, p)| p.len())
            .sum::<usize>();
    }
    let packed_read = t0.elapsed().as_secs_f64() * 1000.0 / 1000.0;
    let conn = Connection::open(&plain)?;
    let t0 = Instant::now();
    let mut read_rows = 0;
    for i in 0..1000 {
        let vm = i * (vms / 1000).max(1);
        let mut stmt =
            conn.prepare_cached("SELECT * FROM points WHERE uuid = ?1 AND ts BETWEEN ?2 AND ?3")?;
        read_rows += stmt
            .query_map(
                params![uuid(vm), (DAY * 86_400) as i64, ((DAY + 1) * 86_400) as i64],
                |_| Ok(()),
            )?
            .count();
    }
    let plain_read = t0.elapsed().as_secs_f64() * 1000.0 / 1000.0;
    println!(
        "activity read of one VM's day ({} and {} points for 1000 VMs): packed {packed_read:.3} ms per VM, one row per point {plain_read:.3} ms per VM",
        read, read_rows
    );

    // The end of a day: 10 % of the VMs, 143 windows in, one more each.
    let tenth = 10;
    let late = dir.join("late.db");
    drop(Store::open(&late)?);
    checkpoint(&late)?;
    let empty = file_size(&late);
    product(&late, vms, 0..143, tenth)?;
    let late_rate = product(&late, vms, 143..144, tenth)?;
    checkpoint(&late)?;
    let late_points = (vms / tenth) as u64 * 144;
    let full_day_bytes = (file_size(&late) - empty) as f64 / late_points as f64;
    let late_plain = dir.join("late-rows.db");
    rows(&late_plain, vms, 0..143, tenth)?;
    let late_reference = rows(&late_plain, vms, 143..144, tenth)?;
    checkpoint(&late_plain)?;
    let full_day_plain = file_size(&late_plain) as f64 / late_points as f64;
    println!(
        "activity at the end of a day, {} VMs with 143 windows, one more each: packed {late_rate:.0} points/s, one row per point {late_reference:.0} points/s (ratio {:.2}); a full day on disk: packed {full_day_bytes:.1} B/point, one row per point {full_day_plain:.1} B/point; 500,000 VMs × 144 windows a day: packed {:.2} GB/day, one row per point {:.2} GB/day",
        vms / tenth,
        late_rate / late_reference,
        full_day_bytes * 72e6 / 1e9,
        full_day_plain * 72e6 / 1e9
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
