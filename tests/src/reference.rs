//! References for the benchmarks, measured in the same run as the product (these machines are
//! noisy, so every figure is a ratio): raw SQLite running the master's statements on its schema
//! with its settings, raw libzmq with CURVE, raw AMQP publishing with confirms, and raw HTTP
//! POSTs.

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
            write_journal(&tx, i as i64, &node, &vm, state)?;
        }
        tx.commit().context("commit")?;
        done = end;
    }
    Ok(count as f64 / t0.elapsed().as_secs_f64())
}

/// A `suspended` lifecycle entry of `vm`, as the core writes it; returns its id.
fn write_journal(
    tx: &rusqlite::Transaction<'_>,
    at: i64,
    node: &str,
    vm: &str,
    state: &str,
) -> rusqlite::Result<i64> {
    tx.prepare_cached(store::JOURNAL_INSERT)?.insert(params![
        at,
        at,
        node,
        vm,
        format!("vm-{vm}"),
        "lifecycle",
        "suspended",
        "paused",
        state
    ])
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

/// A runtime and a connection with a confirming channel to the broker at `url`.
fn confirming_channel(
    url: &str,
) -> Result<(tokio::runtime::Runtime, lapin::Connection, lapin::Channel)> {
    use lapin::options::ConfirmSelectOptions;
    use lapin::{Connection, ConnectionProperties};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (connection, channel) = runtime.block_on(async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>((connection, channel))
    })?;
    Ok((runtime, connection, channel))
}

/// Publishes `body` as the master's bus does (persistent JSON, `message_id`).
async fn publish(
    channel: &lapin::Channel,
    exchange: &str,
    body: &[u8],
    id: usize,
) -> lapin::Result<lapin::PublisherConfirm> {
    let properties = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(id.to_string().into());
    channel
        .basic_publish(
            exchange.into(),
            "vmwatch.lifecycle.suspended.load-00000".into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
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
    let (runtime, connection, channel) = confirming_channel(url)?;
    runtime.block_on(async {
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < count {
            let n = window.min(count - sent);
            let mut confirms = Vec::with_capacity(n);
            for i in 0..n {
                confirms.push(publish(&channel, exchange, body, sent + i).await?);
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
    let (runtime, connection, channel) = confirming_channel(url)?;
    runtime.block_on(async {
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let t0 = Instant::now();
            let confirm = publish(&channel, exchange, body, i).await?;
            anyhow::ensure!(confirm.await?.is_ack(), "the broker refused a message");
            out.push(t0.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(pace.saturating_sub(t0.elapsed())).await;
        }
        out.sort_by(f64::total_cmp);
        let _ = connection.close(200, "done".into()).await;
        Ok(out)
    })
}

/// A database the master's `Store::open` created, holding `nodes` × `vms` running VMs, on a
/// writer with the master's settings: the start of the references below.
fn inventory_db(dir: &Path, name: &str, nodes: usize, vms: usize) -> Result<Connection> {
    let path = dir.join(name);
    drop(store::Store::open(&path)?);
    let mut conn = Connection::open(&path)?;
    store::tune_writer(&conn)?;
    let tx = conn.transaction()?;
    for n in 0..nodes {
        write_node(&tx, &format!("load-{n:05}"), 1)?;
        for v in 0..vms {
            write_vm(
                &tx,
                &format!("load-{n:05}"),
                &format!("{n:08x}-0000-4000-8000-{v:012x}"),
                "running",
                1,
            )?;
        }
    }
    tx.commit()?;
    Ok(conn)
}

/// Raw SQLite committing one lifecycle event at a time (its node row, VM row and journal
/// entry, one durable transaction each, as the master does when events arrive one by one),
/// `count` of them every `pace`: the floor of send → visible. Returns each commit's duration
/// in microseconds, sorted.
pub fn sqlite_commit_latency(
    dir: &Path,
    count: usize,
    pace: std::time::Duration,
) -> Result<Vec<u64>> {
    let mut conn = inventory_db(dir, "reference-latency.db", 10, 50)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let t0 = Instant::now();
        let (node, vm) = (
            format!("load-{:05}", i % 10),
            format!("{:08x}-0000-4000-8000-{:012x}", i % 10, i % 50),
        );
        let tx = conn.transaction()?;
        write_node(&tx, &node, i as i64 + 2)?;
        write_vm(
            &tx,
            &node,
            &vm,
            if i % 2 == 0 { "paused" } else { "running" },
            i as i64,
        )?;
        write_journal(&tx, i as i64, &node, &vm, "paused")?;
        tx.commit()?;
        out.push(t0.elapsed().as_micros() as u64);
        std::thread::sleep(pace.saturating_sub(t0.elapsed()));
    }
    out.sort_unstable();
    Ok(out)
}

/// The CPU time this thread has used.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Raw SQLite doing the steady state's writes for `nodes` × `vms`: per heartbeat the node's
/// row, per stats message the node's row and every VM's row (with its usage), at
/// `beats_per_s` and `stats_per_s`, committed once every 10 ms as the master's core batches
/// them, for `seconds`. Returns the CPU of the writing thread in percent of one core.
pub fn sqlite_steady(
    dir: &Path,
    nodes: usize,
    vms: usize,
    seconds: u64,
    beats_per_s: f64,
    stats_per_s: f64,
) -> Result<f64> {
    let mut conn = inventory_db(dir, "reference-steady.db", nodes, vms)?;
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    let (mut beats, mut stats) = (0usize, 0usize);
    while t0.elapsed() < std::time::Duration::from_secs(seconds) {
        let at = t0.elapsed().as_secs_f64();
        let tx = conn.transaction()?;
        while (beats as f64) < at * beats_per_s {
            write_node(&tx, &format!("load-{:05}", beats % nodes), beats as i64 + 2)?;
            beats += 1;
        }
        while (stats as f64) < at * stats_per_s {
            let n = (stats * 7) % nodes;
            write_node(&tx, &format!("load-{n:05}"), stats as i64 + 2)?;
            for v in 0..vms {
                write_vm(
                    &tx,
                    &format!("load-{n:05}"),
                    &format!("{n:08x}-0000-4000-8000-{v:012x}"),
                    "running",
                    stats as i64,
                )?;
            }
            stats += 1;
        }
        tx.commit()?;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok((thread_cpu() - cpu0).as_secs_f64() * 100.0 / t0.elapsed().as_secs_f64())
}

/// Raw SQLite writing `count` stats messages' VM rows (each message: its node's row and
/// `vms` VM rows with their usage) in batches of `batch` messages: the floor of stats
/// ingestion. Returns VM samples per second.
pub fn sqlite_stats(
    dir: &Path,
    nodes: usize,
    vms: usize,
    count: usize,
    batch: usize,
) -> Result<f64> {
    let mut conn = inventory_db(dir, "reference-stats.db", nodes, vms)?;
    let t0 = Instant::now();
    let mut done = 0;
    while done < count {
        let end = (done + batch).min(count);
        let tx = conn.transaction()?;
        for i in done..end {
            let n = i % nodes;
            write_node(&tx, &format!("load-{n:05}"), i as i64 + 2)?;
            for v in 0..vms {
                write_vm(
                    &tx,
                    &format!("load-{n:05}"),
                    &format!("{n:08x}-0000-4000-8000-{v:012x}"),
                    "running",
                    i as i64,
                )?;
            }
        }
        tx.commit()?;
        done = end;
    }
    Ok((count * vms) as f64 / t0.elapsed().as_secs_f64())
}

/// Raw HTTP: `count` signed POSTs of `body`, one at a time on one keep-alive connection, to
/// `url` (the same receiver the webhook posts to). Returns POSTs per second.
pub fn http_posts(url: &str, key: &[u8], count: usize, body: &[u8]) -> Result<f64> {
    use hmac::{Hmac, Mac};
    let agent = ureq::AgentBuilder::new().build();
    let t0 = Instant::now();
    for i in 0..count {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key)?;
        mac.update(body);
        let signature = format!("sha256={}", hex_lower(&mac.finalize().into_bytes()));
        agent
            .post(url)
            .set("Content-Type", "application/json")
            .set("X-Vmwatch-Event-Id", &i.to_string())
            .set("X-Vmwatch-Signature", &signature)
            .send_bytes(body)?;
    }
    Ok(count as f64 / t0.elapsed().as_secs_f64())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw client of the private cluster's database `url` (no TLS: loopback), with the master's
/// session setting.
fn postgres_client(url: &str, password_file: &Path) -> Result<postgres::Client> {
    let mut config: postgres::Config = url.trim_end_matches("?sslmode=disable").parse()?;
    config.password(std::fs::read_to_string(password_file)?.trim_end());
    let mut client = config.connect(postgres::NoTls)?;
    client.batch_execute("SET synchronous_commit = on")?;
    Ok(client)
}

/// The master's statement as PostgreSQL takes it.
fn pg(client: &mut postgres::Client, sql: &str) -> Result<postgres::Statement> {
    Ok(client.prepare(&store::postgres_placeholders(sql))?)
}

/// The master's writes of node rows, VM rows and journal entries on PostgreSQL, prepared on a
/// raw client: its statements that write many rows at once, as many as it puts in one
/// (`store::ROWS_PER_STATEMENT`).
struct PgStatements {
    nodes: postgres::Statement,
    vms: postgres::Statement,
    journal: postgres::Statement,
}

/// A VM row to write: node id, uuid, state, and the time it was seen.
type VmWrite = (String, String, &'static str, i64);

impl PgStatements {
    fn prepare(client: &mut postgres::Client) -> Result<PgStatements> {
        Ok(PgStatements {
            nodes: pg(client, store::NODE_UPSERT_MANY_PG)?,
            vms: pg(client, store::VM_UPSERT_MANY_PG)?,
            journal: pg(client, store::JOURNAL_INSERT_MANY_PG)?,
        })
    }

    /// Node rows, each `(node_id, seq)`.
    fn nodes(&self, tx: &mut postgres::Transaction<'_>, rows: &[(String, i64)]) -> Result<()> {
        for rows in rows.chunks(store::ROWS_PER_STATEMENT) {
            let n = rows.len();
            let ids: Vec<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
            let seqs: Vec<i64> = rows.iter().map(|(_, seq)| *seq).collect();
            let (ones, zeros, fifties) = (vec![1i64; n], vec![0i64; n], vec![50i64; n]);
            tx.execute(
                &self.nodes,
                &[
                    &ids,
                    &ones,
                    &ones,
                    &ones,
                    &seqs,
                    &vec!["b0b0b0b0-0000-4000-8000-000000000000"; n],
                    &ones,
                    &seqs,
                    &vec!["0.1.0"; n],
                    &ids,
                    &vec!["9.0.0"; n],
                    &fifties,
                    &zeros,
                    &zeros,
                    &zeros,
                    &vec!["[]"; n],
                ],
            )?;
        }
        Ok(())
    }

    fn vms(&self, tx: &mut postgres::Transaction<'_>, rows: &[VmWrite]) -> Result<()> {
        for rows in rows.chunks(store::ROWS_PER_STATEMENT) {
            let n = rows.len();
            let nodes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            let uuids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
            let names: Vec<String> = rows.iter().map(|r| format!("vm-{}", r.1)).collect();
            let states: Vec<&str> = rows.iter().map(|r| r.2).collect();
            let at: Vec<i64> = rows.iter().map(|r| r.3).collect();
            let zeros = vec![0i64; n];
            tx.execute(
                &self.vms,
                &[
                    &nodes,
                    &uuids,
                    &names,
                    &states,
                    &vec!["user"; n],
                    &at,
                    &at,
                    &zeros,
                    &zeros,
                    &zeros,
                    &vec![USAGE; n],
                    &vec![None::<String>; n],
                    &vec![None::<i64>; n],
                    &vec![None::<String>; n],
                ],
            )?;
        }
        Ok(())
    }

    /// A `suspended` entry per VM row written, received at its time.
    fn journal(&self, tx: &mut postgres::Transaction<'_>, rows: &[VmWrite]) -> Result<()> {
        for rows in rows.chunks(store::ROWS_PER_STATEMENT) {
            let n = rows.len();
            let at: Vec<i64> = rows.iter().map(|r| r.3).collect();
            let nodes: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            let uuids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
            let names: Vec<String> = rows.iter().map(|r| format!("vm-{}", r.1)).collect();
            let states: Vec<&str> = rows.iter().map(|r| r.2).collect();
            let ids = tx.query(
                &self.journal,
                &[
                    &at,
                    &at,
                    &nodes,
                    &uuids,
                    &names,
                    &vec!["lifecycle"; n],
                    &vec!["suspended"; n],
                    &vec!["paused"; n],
                    &states,
                ],
            )?;
            anyhow::ensure!(ids.len() == n, "one id per entry");
        }
        Ok(())
    }
}

/// A database of the private cluster that the master's `Store::open` created, holding
/// `nodes` × `vms` running VMs: the start of the PostgreSQL references.
fn postgres_inventory(nodes: usize, vms: usize) -> Result<(postgres::Client, PgStatements)> {
    let cluster = crate::pg::cluster()?;
    let url = cluster.create_database("reference")?;
    drop(store::Store::open(
        &store::Database::parse(&url, Some(&cluster.password_file)).map_err(anyhow::Error::msg)?,
    )?);
    let mut client = postgres_client(&url, &cluster.password_file)?;
    let st = PgStatements::prepare(&mut client)?;
    let mut tx = client.transaction()?;
    let node_rows: Vec<(String, i64)> = (0..nodes).map(|n| (format!("load-{n:05}"), 1)).collect();
    st.nodes(&mut tx, &node_rows)?;
    let vm_rows: Vec<VmWrite> = (0..nodes)
        .flat_map(|n| {
            (0..vms).map(move |v| {
                (
                    format!("load-{n:05}"),
                    format!("{n:08x}-0000-4000-8000-{v:012x}"),
                    "running",
                    1,
                )
            })
        })
        .collect();
    st.vms(&mut tx, &vm_rows)?;
    tx.commit()?;
    Ok((client, st))
}

/// [`sqlite_events`] on raw PostgreSQL: the same rows, the master's statements and schema,
/// batches of `batch` events, each one transaction. Returns events per second.
pub fn postgres_events(nodes: usize, vms: usize, count: usize, batch: usize) -> Result<f64> {
    let (mut client, st) = postgres_inventory(nodes, vms)?;
    let node_id = |n: usize| format!("load-{n:05}");
    let uuid = |n: usize, v: usize| format!("{n:08x}-0000-4000-8000-{v:012x}");
    let t0 = Instant::now();
    let mut done = 0;
    while done < count {
        let end = (done + batch).min(count);
        let mut tx = client.transaction()?;
        let touched: std::collections::BTreeSet<usize> = (done..end).map(|i| i % nodes).collect();
        let node_rows: Vec<(String, i64)> = touched
            .into_iter()
            .map(|n| (node_id(n), end as i64))
            .collect();
        st.nodes(&mut tx, &node_rows)?;
        // One write per row in a batch, as the master's coalescing leaves it: the last.
        let mut last = std::collections::BTreeMap::new();
        let mut entries = Vec::with_capacity(end - done);
        for i in done..end {
            let (n, k) = (i % nodes, i / nodes);
            let state = if k % 2 == 0 { "paused" } else { "running" };
            let row = (node_id(n), uuid(n, k % vms), state, i as i64);
            last.insert((row.0.clone(), row.1.clone()), row.clone());
            entries.push(row);
        }
        let vm_rows: Vec<VmWrite> = last.into_values().collect();
        st.vms(&mut tx, &vm_rows)?;
        st.journal(&mut tx, &entries)?;
        tx.commit().context("commit")?;
        done = end;
    }
    Ok(count as f64 / t0.elapsed().as_secs_f64())
}

/// [`sqlite_steady`] on raw PostgreSQL. Returns the CPU of the writing thread and of the
/// PostgreSQL server's processes, each in percent of one core.
pub fn postgres_steady(
    nodes: usize,
    vms: usize,
    seconds: u64,
    beats_per_s: f64,
    stats_per_s: f64,
) -> Result<(f64, f64)> {
    let (mut client, st) = postgres_inventory(nodes, vms)?;
    let (cpu0, server0, t0) = (thread_cpu(), postgres_server_cpu(), Instant::now());
    let (mut beats, mut stats) = (0usize, 0usize);
    while t0.elapsed() < std::time::Duration::from_secs(seconds) {
        let at = t0.elapsed().as_secs_f64();
        let mut tx = client.transaction()?;
        let mut node_rows = std::collections::BTreeMap::new();
        let mut vm_rows = Vec::new();
        while (beats as f64) < at * beats_per_s {
            node_rows.insert(format!("load-{:05}", beats % nodes), beats as i64 + 2);
            beats += 1;
        }
        while (stats as f64) < at * stats_per_s {
            let n = (stats * 7) % nodes;
            node_rows.insert(format!("load-{n:05}"), stats as i64 + 2);
            for v in 0..vms {
                vm_rows.push((
                    format!("load-{n:05}"),
                    format!("{n:08x}-0000-4000-8000-{v:012x}"),
                    "running",
                    stats as i64,
                ));
            }
            stats += 1;
        }
        let node_rows: Vec<(String, i64)> = node_rows.into_iter().collect();
        st.nodes(&mut tx, &node_rows)?;
        st.vms(&mut tx, &vm_rows)?;
        tx.commit()?;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok((
        (thread_cpu() - cpu0).as_secs_f64() * 100.0 / secs,
        postgres_server_cpu().saturating_sub(server0).as_secs_f64() * 100.0 / secs,
    ))
}

/// CPU used so far by every `postgres` process on the machine (the private cluster is the only
/// one the tests run), reaped backends included (the postmaster's children's time).
pub fn postgres_server_cpu() -> std::time::Duration {
    let tick = 1.0 / 100.0; // USER_HZ on Linux
    let mut ticks = 0u64;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        // Fields after the name: state is 3rd; utime, stime, cutime, cstime are 14th–17th.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields
            .get(11..15)
            .into_iter()
            .flatten()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum::<u64>();
    }
    std::time::Duration::from_secs_f64(ticks as f64 * tick)
}
