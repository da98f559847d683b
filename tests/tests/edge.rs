//! Edge and abuse tests against the real `vmwatch-master` binary (no libvirt needed): raw ZMTP
//! and TCP peers that never finish, connection floods, half-sent HTTP requests, SIGTERM with a
//! long-poll open, nodes signing as each other, and payload strings built to forge metrics
//! series or log lines. Every wait is a poll with a deadline; the only fixed windows are
//! measurements (CPU time).
//!
//! The tests measure time, CPU and memory of the master on a small machine, so they take a
//! file-wide lock and run one at a time even when the harness runs tests in parallel.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmwatch_common::protocol::{
    AgentCounters, Body, DomainEvent, DomainState, Heartbeat, Snapshot,
};
use vmwatch_common::time::now_ms;
use vmwatch_tests::product::{
    parse_openmetrics, require_python_module, rss_kib, temp_dir, wait_for, CpuMeter, Master, SECRET,
};
use vmwatch_tests::sim::{curve_push, master_key, node_key, transport_key, SimNode};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A metric's value, 0 when the series is not (yet) there.
fn metric(master: &Master, series: &str) -> f64 {
    master.metric(series).unwrap_or(0.0)
}

fn rejected(master: &Master, reason: &str) -> f64 {
    metric(
        master,
        &format!("vmwatch_messages_rejected_total{{reason=\"{reason}\"}}"),
    )
}

fn heartbeat() -> Body {
    Body::Heartbeat(Heartbeat {
        libvirt: "up".into(),
        domains: 0,
        version: "t".into(),
        uptime_s: 0,
        agent: AgentCounters::default(),
    })
}

fn event(uuid: &str, name: &str, event: &str, state: &str) -> Body {
    Body::Event(DomainEvent {
        uuid: uuid.into(),
        name: name.into(),
        event: event.into(),
        detail: "x".into(),
        state: state.into(),
        reason: "unknown".into(),
        event_ts: now_ms(),
    })
}

fn snapshot(domains: &[(&str, &str, &str)]) -> Body {
    Body::Snapshot(Snapshot {
        domains: domains
            .iter()
            .map(|(uuid, name, state)| DomainState {
                uuid: (*uuid).into(),
                name: (*name).into(),
                state: (*state).into(),
                reason: "unknown".into(),
            })
            .collect(),
        hostname: "h".into(),
        libvirt_version: "9.0.0".into(),
    })
}

/// A CURVE PUSH socket connected to the master.
fn connect_node(ctx: &zmq::Context, master: &Master) -> zmq::Socket {
    let push = curve_push(ctx).expect("CURVE push socket");
    push.set_linger(0).expect("linger");
    push.connect(&master.endpoint()).expect("connect");
    push
}

/// Sends one heartbeat of a new node `id` and waits (bounded) until the master lists the node;
/// returns how long that took.
fn admit_node(master: &Master, id: &str, timeout: Duration) -> Duration {
    let ctx = zmq::Context::new();
    let push = connect_node(&ctx, master);
    let mut node = SimNode::new(id, now_ms()).expect("node id");
    let t0 = Instant::now();
    push.send_multipart(node.message_now(heartbeat()), 0)
        .expect("send heartbeat");
    wait_for(timeout, &format!("node {id} in /api/v1/nodes"), || {
        master.node(id).map(|_| ())
    });
    t0.elapsed()
}

/// Raises this process's soft descriptor limit to at least `want` (up to the hard limit).
fn raise_own_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid pointer.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        if lim.rlim_cur < want as libc::rlim_t {
            lim.rlim_cur = (want as libc::rlim_t).min(lim.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
        }
    }
    assert!(
        lim.rlim_cur >= want as libc::rlim_t,
        "this test needs {want} descriptors; the hard limit is {}",
        lim.rlim_max
    );
}

/// The soft `Max open files` of a process, from /proc.
fn soft_nofile(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// `n` TCP connections to `port` on 127.0.0.1 that send nothing, opened from 8 threads: a
/// connect whose SYN met a full accept queue waits a second for its retransmission, and in
/// parallel those seconds overlap.
/// A GET from another loopback source address: (status, body).
fn get_from(source: &str, port: u16, path: &str) -> (u16, String) {
    vmwatch_tests::product::raw_http(
        source,
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

fn open_connections(port: u16, n: usize) -> Vec<TcpStream> {
    const THREADS: usize = 8;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                scope.spawn(move || {
                    (t..n)
                        .step_by(THREADS)
                        .map(|i| {
                            TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                                .unwrap_or_else(|e| {
                                    panic!("connection {i} of {n} to port {port}: {e}")
                                })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("connecting thread"))
            .collect()
    })
}

/// Whether the peer closed (or reset) a non-blocking stream; reads and discards what it sent.
fn peer_closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Marks the streams the peer closed; returns how many are closed.
fn count_closed(streams: &mut [TcpStream], closed: &mut [bool]) -> usize {
    for (s, c) in streams.iter_mut().zip(closed.iter_mut()) {
        if !*c {
            *c = peer_closed(s);
        }
    }
    closed.iter().filter(|c| **c).count()
}

/// A ZMTP 3.0 greeting offering the NULL mechanism, as a client (RFC 23).
fn zmtp_null_greeting() -> Vec<u8> {
    let mut g = vec![0xFF];
    g.extend([0u8; 8]);
    g.push(0x7F);
    g.extend([3, 0]);
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    g.extend(mechanism);
    g.push(0); // as-server
    g.extend([0u8; 31]);
    assert_eq!(g.len(), 64);
    g
}

/// A READY command announcing a PUSH socket (RFC 23, short command frame).
fn zmtp_ready_push() -> Vec<u8> {
    let mut body = vec![5];
    body.extend(b"READY");
    body.push(11);
    body.extend(b"Socket-Type");
    body.extend(4u32.to_be_bytes());
    body.extend(b"PUSH");
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend(body);
    frame
}

/// The node port is CURVE-only: a raw ZMTP peer offering the NULL mechanism is dropped at its
/// greeting, so the 512 MiB unfinished multipart it goes on to send is never read, and costs
/// the master no memory. (A peer with the transport key cannot send an unfinished multipart
/// through libzmq at all; `ZMQ_MAXMSGSIZE` bounds each of its frames.)
#[test]
fn a_raw_zmtp_peer_without_curve_is_dropped_before_its_data_is_read() {
    let _serial = serial();
    const FRAME: usize = 1 << 20;
    const ATTEMPT: usize = 512; // frames: 512 MiB
    let dir = temp_dir("edge-zmtp");
    let master = Master::start(&dir, &[]).expect("master");
    let pid = master.pid().expect("pid");
    let before = rss_kib(pid).expect("master RSS");

    // Sample the master's RSS every 10 ms while the peer sends.
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let mut peer =
        TcpStream::connect(("127.0.0.1", master.zmq_port)).expect("connect to the node port");
    peer.set_write_timeout(Some(Duration::from_millis(500)))
        .expect("write timeout");
    // A reader on the side: EOF or a reset ends the connection from the peer's view.
    let eof = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut r = peer.try_clone().expect("clone stream");
        let eof = eof.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            eof.store(true, Ordering::Relaxed);
        })
    };

    let t0 = Instant::now();
    let mut header = vec![0x03]; // MORE | LONG
    header.extend((FRAME as u64).to_be_bytes());
    let body = vec![0x5Au8; FRAME];
    let mut sent = 0usize;
    let mut write_error = None;
    let greeting = [zmtp_null_greeting(), zmtp_ready_push()].concat();
    let chunks =
        std::iter::once(&greeting[..]).chain((0..ATTEMPT).flat_map(|_| [&header[..], &body[..]]));
    for chunk in chunks {
        if eof.load(Ordering::Relaxed) {
            break;
        }
        // The whole chunk or an error: a partial write is continued, never skipped, so the
        // stream stays well-formed ZMTP.
        let mut off = 0;
        while off < chunk.len() && !eof.load(Ordering::Relaxed) {
            assert!(
                t0.elapsed() < Duration::from_secs(15),
                "the master still holds the connection after {:?} ({sent} bytes sent)",
                t0.elapsed()
            );
            match peer.write(&chunk[off..]) {
                Ok(0) => break,
                Ok(n) => {
                    off += n;
                    sent += n;
                }
                // Blocked, not closed: the master is not reading; go on until the deadline.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => {
                    write_error = Some(e);
                    break;
                }
            }
        }
        if write_error.is_some() {
            break;
        }
    }
    let open = write_error.is_none();
    let closed_after = t0.elapsed();
    assert!(
        !open || eof.load(Ordering::Relaxed),
        "the master took all {ATTEMPT} MiB of an unfinished message without closing"
    );
    // What the kernel buffers took before the reset, not what the master read.
    assert!(
        sent < 64 * FRAME,
        "{sent} bytes went to a peer that never completed the CURVE handshake"
    );
    drop(peer);
    reader.join().expect("reader thread");
    // Keep sampling a little: memory the master might still be taking after the close counts.
    std::thread::sleep(Duration::from_millis(500));
    sampling.store(false, Ordering::Relaxed);
    sampler.join().expect("sampler thread");
    let growth_kib = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "raw ZMTP peer: closed after {closed_after:?}, {sent} bytes written, write error {write_error:?}; \
         master RSS {before} KiB before, growth {growth_kib} KiB"
    );
    assert!(
        growth_kib < 64 * 1024,
        "master RSS grew by {growth_kib} KiB under an unfinished multipart message"
    );
    wait_for(
        Duration::from_secs(5),
        "vmwatch_zmq_handshake_failures_total >= 1",
        || (metric(&master, "vmwatch_zmq_handshake_failures_total") >= 1.0).then_some(()),
    );
    assert_eq!(master.get_raw("/healthz").expect("healthz").0, 200);
}

#[test]
fn connection_flood_at_a_low_descriptor_limit() {
    let _serial = serial();
    const FLOOD: usize = 1200;
    raise_own_nofile(4096);
    let dir = temp_dir("edge-flood");
    // 1,200 connections from one address: above the per-address cap's default (256).
    let master = Master::start_with_nofile(&dir, &[("max_connections_per_address", "10000")], 1024)
        .expect("master");
    let pid = master.pid().expect("pid");
    let limit = soft_nofile(pid);
    // Opened in batches the master has accepted before the next: libzmq's listen backlog is
    // 100, and a SYN that finds it full waits a second or more for its retransmission, while
    // the first connections of the flood time out of the handshake after 10 s.
    let flood_start = Instant::now();
    let mut flood = Vec::with_capacity(FLOOD);
    while flood.len() < FLOOD {
        flood.extend(open_connections(master.zmq_port, 50));
        let want = flood.len() as f64;
        wait_for(
            Duration::from_secs(5),
            &format!(
                "the master holding {want} connections (its soft descriptor limit: {limit:?})"
            ),
            || (metric(&master, "vmwatch_zmq_connections") >= want).then_some(()),
        );
    }
    let opened = flood_start.elapsed();

    let admitted = admit_node(&master, "flood-ok", Duration::from_secs(5));
    let t = Instant::now();
    let (status, body) = master.get_raw("/healthz").expect("healthz");
    let healthz = t.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(
        healthz < Duration::from_secs(2),
        "/healthz took {healthz:?} under the flood"
    );

    let window = Duration::from_secs(3);
    let meter = CpuMeter::start(pid);
    std::thread::sleep(window);
    let cpu = meter.percent() / 100.0;
    let held = metric(&master, "vmwatch_zmq_connections");
    eprintln!(
        "flood of {FLOOD}: opened in {opened:?}, master soft NOFILE {limit:?}; node admitted in \
         {admitted:?}; /healthz in {healthz:?}; master CPU {:.1} % of a core over {window:?}; \
         {held} connections held at the end of the window ({:?} after the flood began)",
        cpu * 100.0,
        flood_start.elapsed()
    );
    assert!(
        held >= FLOOD as f64,
        "the flood was no longer held at the end of the CPU window ({held} connections)"
    );
    assert!(
        cpu < 0.5,
        "master used {:.1} % of a core while {FLOOD} idle connections were held",
        cpu * 100.0
    );
    // Peers that never finish the handshake are dropped after ZMQ_HANDSHAKE_IVL (10 s).
    wait_for(
        Duration::from_secs(20),
        "the flood dropped by the handshake timeout",
        || (metric(&master, "vmwatch_zmq_connections") <= 1.0).then_some(()),
    );
    drop(flood);
}

#[test]
fn connections_beyond_max_connections_are_closed() {
    let _serial = serial();
    let dir = temp_dir("edge-maxconn");
    let master = Master::start(&dir, &[("max_connections", "50")]).expect("master");
    let mut flood = open_connections(master.zmq_port, 120);
    for s in &flood {
        s.set_nonblocking(true).expect("non-blocking");
    }
    let mut closed = vec![false; flood.len()];
    // Within 5 s, well before the 10 s handshake timeout could be what closes them.
    let (refused, held, seen_closed) = wait_for(
        Duration::from_secs(5),
        "70 connections refused and closed, at most 50 held",
        || {
            let refused = metric(&master, "vmwatch_zmq_connections_refused_total");
            let held = master.metric("vmwatch_zmq_connections").ok()?;
            let seen_closed = count_closed(&mut flood, &mut closed);
            (refused >= 70.0 && held <= 50.0 && seen_closed >= 70).then_some((
                refused,
                held,
                seen_closed,
            ))
        },
    );
    eprintln!("max_connections=50, 120 opened: {refused} refused, {held} held, {seen_closed} seen closed by the peer");
    drop(flood);
    wait_for(
        Duration::from_secs(5),
        "the connection gauge back at 0",
        || (metric(&master, "vmwatch_zmq_connections") == 0.0).then_some(()),
    );
    let admitted = admit_node(&master, "after-flood", Duration::from_secs(5));
    eprintln!("a CURVE node admitted {admitted:?} after the flood");
}

#[test]
fn half_sent_http_requests_are_closed() {
    let _serial = serial();
    const N: usize = 300;
    let dir = temp_dir("edge-http");
    let master = Master::start(&dir, &[]).expect("master");
    let mut conns = open_connections(master.http_port, N);
    for s in &mut conns {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .expect("send half a request");
        s.set_nonblocking(true).expect("non-blocking");
    }
    let t0 = Instant::now();
    // One address holds at most half the 512 slots (issue 24, item 4): the rest are closed at
    // once and counted.
    const PER_ADDRESS: usize = 256;
    // 127.0.0.1 holds its 256: the checks come from another address.
    let metric_from_2 = |series: &str| -> f64 {
        let (_, text) = get_from("127.0.0.2", master.http_port, "/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    wait_for(
        Duration::from_secs(5),
        "the half-sent requests held by the master, up to the per-address cap",
        || {
            (metric_from_2("vmwatch_http_connections") >= PER_ADDRESS as f64
                && metric_from_2("vmwatch_http_connections_refused_per_address_total")
                    >= (N - PER_ADDRESS) as f64)
                .then_some(())
        },
    );
    // Another address is still served at once.
    let t = Instant::now();
    let (status, body) = get_from("127.0.0.2", master.http_port, "/healthz");
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "/healthz answered in {:?} beside {N} half-sent requests",
        t.elapsed()
    );
    let mut closed = vec![false; N];
    wait_for(
        Duration::from_secs(40),
        "every half-sent request closed",
        || (count_closed(&mut conns, &mut closed) == N).then_some(()),
    );
    eprintln!(
        "{N} half-sent HTTP requests closed within {:?}",
        t0.elapsed()
    );
    wait_for(
        Duration::from_secs(5),
        "vmwatch_http_connections back to at most 1 (this request)",
        || (metric(&master, "vmwatch_http_connections") <= 1.0).then_some(()),
    );
}

#[test]
fn sigterm_with_an_open_wait_exits_within_five_seconds() {
    let _serial = serial();
    let dir = temp_dir("edge-sigterm");
    let mut master = Master::start(&dir, &[]).expect("master");
    let url = master
        .url("/api/v1/vms/00000000-0000-4000-8000-00000000abcd/wait?state=shutoff&timeout=3600");
    let waiter = std::thread::spawn(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        match agent.get(&url).call() {
            Ok(r) => Ok(r.status()),
            Err(ureq::Error::Status(code, _)) => Ok(code),
            Err(e) => Err(e.to_string()),
        }
    });
    wait_for(Duration::from_secs(5), "one request waiting", || {
        (metric(&master, "vmwatch_api_waiters") == 1.0).then_some(())
    });
    let t0 = Instant::now();
    let code = master.stop().expect("stop the master");
    let took = t0.elapsed();
    eprintln!("master exited {took:?} after SIGTERM with status {code}");
    assert_eq!(code, 0, "exit status after SIGTERM");
    assert!(
        took < Duration::from_secs(5),
        "the master took {took:?} to exit"
    );
    assert_eq!(
        waiter.join().expect("waiter thread"),
        Ok(503),
        "the open wait is answered 503"
    );
    assert!(
        master.log_text().contains("vmwatch-master stopped"),
        "log lacks the stop line"
    );
}

#[test]
fn a_node_cannot_sign_as_another_in_derived_mode() {
    let _serial = serial();
    const VM: &str = "00000000-0000-4000-8000-0000000000a1";
    const VM_B: &str = "00000000-0000-4000-8000-0000000000b1";
    let dir = temp_dir("edge-derived");
    let master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let push = connect_node(&ctx, &master);
    let mut a = SimNode::new("hv-a", now_ms()).expect("node id");
    let mut b = SimNode::new("hv-b", now_ms()).expect("node id");
    push.send_multipart(a.message_now(snapshot(&[(VM, "vm-a", "running")])), 0)
        .expect("send");
    push.send_multipart(b.message_now(snapshot(&[(VM_B, "vm-b", "running")])), 0)
        .expect("send");
    wait_for(Duration::from_secs(10), "both nodes' VMs", || {
        (master.vm_state(VM, "hv-a").is_some() && master.vm_state(VM_B, "hv-b").is_some())
            .then_some(())
    });

    // hv-b's key is good for hv-b, not for hv-a: an empty snapshot as hv-a would delete its VM.
    let forged = a.message_with_key(now_ms(), snapshot(&[]), node_key("hv-b").as_bytes());
    push.send_multipart(forged, 0).expect("send");
    wait_for(Duration::from_secs(10), "one bad_signature", || {
        (rejected(&master, "bad_signature") == 1.0).then_some(())
    });
    // Nor is the master secret itself a node key in derived mode.
    let forged = a.message_with_key(now_ms(), snapshot(&[]), SECRET.as_bytes());
    push.send_multipart(forged, 0).expect("send");
    wait_for(Duration::from_secs(10), "two bad_signature", || {
        (rejected(&master, "bad_signature") == 2.0).then_some(())
    });
    assert_eq!(
        master.vm_state(VM, "hv-a").as_deref(),
        Some("running"),
        "hv-a's VM survived the forged snapshots"
    );
    assert_eq!(
        metric(
            &master,
            "vmwatch_messages_accepted_total{kind=\"snapshot\"}"
        ),
        2.0,
        "only the two genuine snapshots were accepted"
    );

    // With node_keys=shared the master secret is every node's key.
    let dir = temp_dir("edge-shared");
    let shared = Master::start(&dir, &[("node_keys", "shared")]).expect("shared master");
    let push = connect_node(&ctx, &shared);
    let mut a = SimNode::new("hv-a", now_ms()).expect("node id");
    push.send_multipart(
        a.message_with_key(
            now_ms(),
            snapshot(&[(VM, "vm-a", "running")]),
            SECRET.as_bytes(),
        ),
        0,
    )
    .expect("send");
    wait_for(
        Duration::from_secs(10),
        "the snapshot signed with the master secret accepted in shared mode",
        || shared.vm_state(VM, "hv-a").filter(|s| s == "running"),
    );
    assert_eq!(rejected(&shared, "bad_signature"), 0.0);
}

#[test]
fn state_strings_cannot_inject_metrics() {
    let _serial = serial();
    if !require_python_module(
        "state_strings_cannot_inject_metrics",
        "prometheus_client.openmetrics.parser",
    ) {
        return;
    }
    const EVIL: &str = "running\"} 1\nvmwatch_nodes_up 4242\n# EOF";
    const VM_SNAP: &str = "00000000-0000-4000-8000-0000000000c1";
    const VM_EVENT: &str = "00000000-0000-4000-8000-0000000000c2";
    let dir = temp_dir("edge-metrics");
    let master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let push = connect_node(&ctx, &master);
    let mut node = SimNode::new("inject", now_ms()).expect("node id");
    push.send_multipart(node.message_now(snapshot(&[(VM_SNAP, "snap", EVIL)])), 0)
        .expect("send");
    push.send_multipart(node.message_now(event(VM_EVENT, "ev", EVIL, EVIL)), 0)
        .expect("send");
    wait_for(Duration::from_secs(10), "both messages accepted", || {
        (metric(
            &master,
            "vmwatch_messages_accepted_total{kind=\"snapshot\"}",
        ) == 1.0
            && metric(&master, "vmwatch_messages_accepted_total{kind=\"event\"}") == 1.0)
            .then_some(())
    });
    for uuid in [VM_SNAP, VM_EVENT] {
        let state = master.vm_state(uuid, "inject").expect("VM row");
        assert_eq!(state, "unknown-running1vmwatch_nodes_up", "{uuid}");
    }
    // The gauges are recomputed every second; a word outside the vocabulary counts as `other`.
    let (text, samples) = wait_for(
        Duration::from_secs(5),
        "both VMs counted in vmwatch_vms{state=\"other\"}",
        || {
            let text = master.metrics().ok()?;
            let samples = parse_openmetrics(&text);
            samples
                .iter()
                .any(|(n, l, v)| {
                    n == "vmwatch_vms"
                        && l.get("state").map(String::as_str) == Some("other")
                        && *v == 2.0
                })
                .then_some((text, samples))
        },
    );
    assert!(
        !text.lines().any(|l| l.starts_with("vmwatch_nodes_up 4242")),
        "a forged series line:\n{text}"
    );
    let nodes_up: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == "vmwatch_nodes_up" && l.is_empty())
        .map(|(_, _, v)| *v)
        .collect();
    assert_eq!(nodes_up, vec![1.0], "vmwatch_nodes_up samples");
    let bad: Vec<_> = samples
        .iter()
        .filter(|(_, l, _)| l.values().any(|v| v.contains('"') || v.contains('\n')))
        .collect();
    assert!(
        bad.is_empty(),
        "label values with a quote or newline: {bad:?}"
    );
}

#[test]
fn vm_names_cannot_inject_log_lines() {
    let _serial = serial();
    const EVIL: &str = "evil\nWARN forged line \u{1b}[31m";
    const VM_EVIL: &str = "00000000-0000-4000-8000-0000000000d1";
    const VM_LONG: &str = "00000000-0000-4000-8000-0000000000d2";
    let dir = temp_dir("edge-logs");
    let master = Master::start(&dir, &[("log_level", "info")]).expect("master");
    let ctx = zmq::Context::new();
    let push = connect_node(&ctx, &master);
    let mut node = SimNode::new("namer", now_ms()).expect("node id");
    let long = "x".repeat(900_000);
    push.send_multipart(
        node.message_now(event(VM_EVIL, EVIL, "defined", "shutoff")),
        0,
    )
    .expect("send");
    push.send_multipart(
        node.message_now(event(VM_LONG, &long, "defined", "shutoff")),
        0,
    )
    .expect("send");
    wait_for(Duration::from_secs(10), "both VMs in the API", || {
        (master.vm_state(VM_EVIL, "namer").is_some() && master.vm_state(VM_LONG, "namer").is_some())
            .then_some(())
    });
    // The journal lines are logged after the commit, node-supplied strings quoted and escaped
    // (`name="evil\nWARN …"`), so a name can neither start a line nor add a field.
    wait_for(
        Duration::from_secs(10),
        "the evil name's journal line, quoted and escaped",
        || {
            master
                .log_text()
                .contains(r#"name="evil\nWARN forged line \u{1b}[31m"#)
                .then_some(())
        },
    );
    let raw = std::fs::read(&master.log).expect("read master log");
    assert!(!raw.contains(&0x1b), "a raw ESC byte in the master log");
    let text = String::from_utf8_lossy(&raw);
    let forged: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("WARN forged"))
        .collect();
    assert!(forged.is_empty(), "forged log lines: {forged:?}");
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");

    let (status, page) = master.get_raw("/api/v1/events").expect("events");
    assert_eq!(status, 200, "{page}");
    assert!(page.len() < 1 << 20, "events page of {} bytes", page.len());
    let events: serde_json::Value = serde_json::from_str(&page).expect("events JSON");
    let names: Vec<usize> = events["events"]
        .as_array()
        .expect("events array")
        .iter()
        .filter(|e| e["uuid"] == VM_LONG)
        .map(|e| e["name"].as_str().unwrap_or_default().len())
        .collect();
    assert_eq!(names, vec![256], "the long name in the journal");
    let vms = master.get("/api/v1/vms?node=namer").expect("vms");
    let row = vms["vms"]
        .as_array()
        .expect("vms array")
        .iter()
        .find(|r| r["uuid"] == VM_LONG)
        .expect("the long-named VM");
    assert_eq!(row["name"].as_str().expect("name").len(), 256);
    let evil = master.vm_row(VM_EVIL, "namer").expect("the evil VM");
    assert_eq!(
        evil["name"], EVIL,
        "the API returns the name as sent (JSON-escaped)"
    );
}

#[test]
fn node_ids_are_capped() {
    let _serial = serial();
    const NODES: usize = 5000;
    const CAP: usize = 100;
    let dir = temp_dir("edge-maxnodes");
    let master = Master::start(&dir, &[("max_nodes", "100")]).expect("master");
    let ids: Vec<String> = (0..NODES).map(|i| format!("many-{i:05}")).collect();
    let messages: Vec<[Vec<u8>; 4]> = ids
        .iter()
        .map(|id| {
            SimNode::new(id, now_ms())
                .expect("node id")
                .message_now(heartbeat())
        })
        .collect();
    let ctx = zmq::Context::new();
    let push = connect_node(&ctx, &master);
    let t0 = Instant::now();
    for m in messages {
        push.send_multipart(m, 0).expect("send");
    }
    wait_for(
        Duration::from_secs(60),
        "4900 rejected as too_many_nodes and 100 accepted",
        || {
            (rejected(&master, "too_many_nodes") == (NODES - CAP) as f64
                && metric(
                    &master,
                    "vmwatch_messages_accepted_total{kind=\"heartbeat\"}",
                ) == CAP as f64)
                .then_some(())
        },
    );
    eprintln!("{NODES} node ids handled in {:?}", t0.elapsed());
    let nodes = master.get("/api/v1/nodes").expect("nodes");
    let mut listed: Vec<&str> = nodes["nodes"]
        .as_array()
        .expect("nodes array")
        .iter()
        .map(|n| n["node_id"].as_str().unwrap_or_default())
        .collect();
    listed.sort_unstable();
    let first: Vec<&str> = ids[..CAP].iter().map(String::as_str).collect();
    assert_eq!(listed, first, "the first {CAP} node ids are kept");
    // The per-node gauges are refreshed every second: wait for the 100, then watch that no
    // rejected id ever gets a series.
    let node_up_series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("vmwatch_node_up{"))
            .count()
    };
    wait_for(Duration::from_secs(5), "100 vmwatch_node_up series", || {
        (node_up_series(&master.metrics().ok()?) == CAP).then_some(())
    });
    let t = Instant::now();
    let mut size = 0;
    while t.elapsed() < Duration::from_secs(2) {
        let text = master.metrics().expect("metrics");
        let series = node_up_series(&text);
        assert!(series <= CAP, "{series} vmwatch_node_up series");
        size = size.max(text.len());
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("/metrics: at most {size} bytes, {CAP} vmwatch_node_up series");
    assert!(size < 256 * 1024, "/metrics grew to {size} bytes");
}

/// A node in Python (pyzmq): one heartbeat as `node_id` signed with `key`; over CURVE when a
/// master public key and a transport secret key (Z85) are given, else plain.
const PY_NODE: &str = r#"
import hashlib, hmac, json, sys, time, uuid
import zmq
endpoint, node_id, key, server_key, client_secret = sys.argv[1:6]
ctx = zmq.Context()
push = ctx.socket(zmq.PUSH)
push.setsockopt(zmq.LINGER, 3000)
if server_key:
    push.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    push.setsockopt(zmq.CURVE_SECRETKEY, client_secret.encode())
    push.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(client_secret.encode()))
push.connect(endpoint)
now = int(time.time() * 1000)
payload = json.dumps({"boot": str(uuid.uuid4()), "boot_ts": now, "seq": 1, "ts": now,
                      "kind": "heartbeat", "libvirt": "up", "domains": 0, "version": "py",
                      "uptime_s": 0}, separators=(",", ":")).encode()
mac = hmac.new(key.encode(), b"vmwatch/1\x00" + node_id.encode() + b"\x00" + payload,
               hashlib.sha256).digest()
push.send_multipart([b"vmwatch/1", node_id.encode(), payload, mac])
push.close()
ctx.term()
"#;

fn run_py_node(master: &Master, node_id: &str, key: &str, curve: Option<(&str, &str)>) {
    let (server, client) = curve.unwrap_or(("", ""));
    let out = std::process::Command::new("/usr/bin/python3")
        .args([
            "-c",
            PY_NODE,
            &master.endpoint(),
            node_id,
            key,
            server,
            client,
        ])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "the pyzmq node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pyzmq_without_the_key_or_with_another_nodes_key_changes_nothing() {
    let _serial = serial();
    if !require_python_module(
        "pyzmq_without_the_key_or_with_another_nodes_key_changes_nothing",
        "zmq",
    ) {
        return;
    }
    let dir = temp_dir("edge-pyzmq");
    let master = Master::start(&dir, &[]).expect("master");
    let nodes = |m: &Master| m.get("/api/v1/nodes").expect("nodes")["nodes"].clone();
    let (server, transport) = (master_key(), transport_key());

    // (a) No CURVE, the right HMAC: the handshake fails, nothing is delivered.
    let failures0 = metric(&master, "vmwatch_zmq_handshake_failures_total");
    run_py_node(&master, "py", &node_key("py"), None);
    wait_for(
        Duration::from_secs(10),
        "the plain PUSH's handshake failures counted",
        || (metric(&master, "vmwatch_zmq_handshake_failures_total") > failures0).then_some(()),
    );
    assert_eq!(nodes(&master), serde_json::json!([]), "after (a)");

    // (b) CURVE with the fleet keys, signing as "py" with another node's key.
    run_py_node(
        &master,
        "py",
        &node_key("other"),
        Some((&server, &transport)),
    );
    wait_for(Duration::from_secs(10), "one bad_signature", || {
        (rejected(&master, "bad_signature") == 1.0).then_some(())
    });
    assert_eq!(nodes(&master), serde_json::json!([]), "after (b)");
    assert_eq!(
        metric(
            &master,
            "vmwatch_messages_accepted_total{kind=\"heartbeat\"}"
        ),
        0.0
    );

    // Control: the same script with CURVE and py's own key is accepted, so (a) and (b) failed
    // for their keys alone.
    run_py_node(&master, "py", &node_key("py"), Some((&server, &transport)));
    wait_for(
        Duration::from_secs(10),
        "node py from the control run",
        || master.node("py").map(|_| ()),
    );
    assert_eq!(rejected(&master, "bad_signature"), 1.0);
}
