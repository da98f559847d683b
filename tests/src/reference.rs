//! References for the benchmarks, measured in the same run as the product (these machines are
//! noisy, so every figure is a ratio): raw SQLite running the master's statements on its schema
//! with its settings, raw libzmq with CURVE, and raw AMQP publishing with confirms.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use vmwatch_master::store;

/// The stored usage JSON of a VM with one sample (about the size the master writes).
const USAGE: &str = r#"{"sample":{"ts":1700000000000,"tx_pkts":12345,"wr_reqs":678,"rx_pkts":23456,"rd_reqs":789,"cpu_time_ns":123456789012},"nics":1,"disks":1,"net":{"idle":false,"since":null,"quiet_windows":0,"last_delta":3,"no_device":false},"disk":{"idle":false,"since":null,"quiet_windows":0,"last_delta":1,"no_device":false},"last_window_ms":600000}"#;

/// Raw SQLite doing the writes of `count` lifecycle events from `nodes` nodes × `vms` VMs
/// the way the master's core does, with the master's own statements (`store::NODE_UPSERT`,
/// `VM_UPSERT`, `JOURNAL_INSERT`): batches of `batch` events, each batch one transaction
/// holding one node row per node touched, then per event the VM row and a journal entry, on a
/// database the master's `Store::open` created (same schema and indexes) with the writer's own
/// settings (`store::tune_writer`). Returns events per second.
pub fn sqlite_events(
    dir: &Path,
    nodes: usize,
    vms: usize,
    count: usize,
    batch: usize,
) -> Result<f64> {
    let path = dir.join("reference.db");
    drop(store::Store::open(&path)?);
    let mut conn = Connection::open(&path)?;
    store::tune_writer(&conn)?;
    let node_id = |n: usize| format!("load-{n:05}");
    let uuid = |n: usize, v: usize| format!("{n:08x}-0000-4000-8000-{v:012x}");
    // The inventory, as after the loadgen's snapshots.
    {
        let tx = conn.transaction()?;
        for n in 0..nodes {
            write_node(&tx, &node_id(n), 1)?;
            for v in 0..vms {
                write_vm(&tx, &node_id(n), &uuid(n, v), "running", 1)?;
            }
        }
        tx.commit()?;
    }
    let t0 = Instant::now();
    let mut done = 0;
    while done < count {
        let end = (done + batch).min(count);
        let tx = conn.transaction()?;
        let touched: std::collections::BTreeSet<usize> = (done..end).map(|i| i % nodes).collect();
        for n in touched {
            write_node(&tx, &node_id(n), end as i64)?;
        }
        for i in done..end {
            let (n, k) = (i % nodes, i / nodes);
            let state = if k % 2 == 0 { "paused" } else { "running" };
            let (node, vm) = (node_id(n), uuid(n, k % vms));
            write_vm(&tx, &node, &vm, state, i as i64)?;
            tx.prepare_cached(store::JOURNAL_INSERT)?.execute(params![
                i as i64,
                i as i64,
                node,
                vm,
                format!("vm-{vm}"),
                "lifecycle",
                "suspended",
                "paused",
                state
            ])?;
        }
        tx.commit().context("commit")?;
        done = end;
    }
    Ok(count as f64 / t0.elapsed().as_secs_f64())
}

fn write_node(tx: &rusqlite::Transaction<'_>, node_id: &str, seq: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached(store::NODE_UPSERT)?.execute(params![
        node_id,
        true,
        true,
        1,
        seq,
        "b0b0b0b0-0000-4000-8000-000000000000",
        1,
        seq,
        "0.1.0",
        node_id,
        "9.0.0",
        50,
        0,
        0,
        0,
        "[]"
    ])
}

fn write_vm(
    tx: &rusqlite::Transaction<'_>,
    node_id: &str,
    uuid: &str,
    state: &str,
    at: i64,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(store::VM_UPSERT)?.execute(params![
        node_id,
        uuid,
        format!("vm-{uuid}"),
        state,
        "user",
        at,
        at,
        false,
        false,
        false,
        USAGE,
        None::<String>,
        None::<i64>,
        None::<String>
    ])
}

/// Raw libzmq PUSH→PULL over loopback TCP with CURVE, one connection, `count` copies of
/// `message` (every frame, each encrypted on its own as the product's are): the floor of the
/// master's node port. Returns messages per second received.
pub fn zmq_curve(count: usize, message: &[Vec<u8>]) -> Result<f64> {
    let ctx = zmq::Context::new();
    let server = zmq::CurveKeyPair::new()?;
    let client = zmq::CurveKeyPair::new()?;
    let pull = ctx.socket(zmq::PULL)?;
    pull.set_curve_server(true)?;
    pull.set_curve_secretkey(&server.secret_key)?;
    pull.set_rcvhwm(1000)?;
    pull.bind("tcp://127.0.0.1:*")?;
    let endpoint = pull
        .get_last_endpoint()?
        .map_err(|_| anyhow::anyhow!("endpoint is not UTF-8"))?;
    let push = ctx.socket(zmq::PUSH)?;
    push.set_curve_serverkey(&server.public_key)?;
    push.set_curve_publickey(&client.public_key)?;
    push.set_curve_secretkey(&client.secret_key)?;
    push.set_sndhwm(0)?;
    push.connect(&endpoint)?;
    // One message through first: the handshake is not what is measured.
    push.send_multipart(message, 0)?;
    pull.recv_multipart(0)?;
    let message = message.to_vec();
    let sender = std::thread::spawn(move || -> Result<zmq::Socket> {
        for _ in 0..count {
            push.send_multipart(&message, 0)?;
        }
        Ok(push)
    });
    let t0 = Instant::now();
    for _ in 0..count {
        pull.recv_multipart(0)?;
    }
    let rate = count as f64 / t0.elapsed().as_secs_f64();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(rate)
}

/// Raw AMQP publishing in the same run as the product's bus (lapin, like the master): `count`
/// persistent messages of `body` to `exchange` on the broker at `url`, `window` published
/// before waiting for their publisher confirms, as the master's bus does. Returns messages
/// per second.
pub fn amqp_publish(
    url: &str,
    exchange: &str,
    count: usize,
    body: &[u8],
    window: usize,
) -> Result<f64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < count {
            let n = window.min(count - sent);
            let mut confirms = Vec::with_capacity(n);
            for i in 0..n {
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id((sent + i).to_string().into());
                confirms.push(
                    channel
                        .basic_publish(
                            exchange.into(),
                            "vmwatch.lifecycle.suspended.load-00000".into(),
                            BasicPublishOptions::default(),
                            body,
                            properties,
                        )
                        .await?,
                );
            }
            for c in confirms {
                anyhow::ensure!(c.await?.is_ack(), "the broker refused a message");
            }
            sent += n;
        }
        let rate = count as f64 / t0.elapsed().as_secs_f64();
        let _ = connection.close(200, "done".into()).await;
        Ok(rate)
    })
}

/// Raw AMQP confirm latency in the same run: `count` persistent messages of `body`, one at a
/// time every `pace`, each timed from `basic_publish` to its confirm. Returns the sorted
/// latencies in milliseconds.
pub fn amqp_confirm_latency(
    url: &str,
    exchange: &str,
    count: usize,
    body: &[u8],
    pace: std::time::Duration,
) -> Result<Vec<f64>> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let t0 = Instant::now();
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(i.to_string().into());
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    "vmwatch.lifecycle.suspended.load-00000".into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?;
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
            out.push(t0.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(pace.saturating_sub(t0.elapsed())).await;
        }
        out.sort_by(f64::total_cmp);
        let _ = connection.close(200, "done".into()).await;
        Ok(out)
    })
}
