//! The review round (issue 24) against the real master: the loopback API is no CSRF or
//! DNS-rebinding target, the webhook follows no redirect, no secret of a URL reaches a log line
//! or `--check-config`, node-supplied strings cannot forge log fields.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use vmwatch_common::time::now_ms;
use vmwatch_tests::product::{temp_dir, wait_for, Master};
use vmwatch_tests::receiver::PanelReceiver;
use vmwatch_tests::sim::{curve_push, SimNode};

/// A raw HTTP/1.1 request to the master: (status, body).
fn raw_http(master: &Master, request: &str) -> (u16, String) {
    vmwatch_tests::product::raw_http("127.0.0.1", master.http_port, request)
}

/// Sends one `started` event of VM `uuid` named `name` from a new node `id` (fleet key); the
/// socket is returned so the message is not dropped with it.
fn send_started(master: &Master, id: &str, uuid: &str, name: &str) -> (zmq::Socket, zmq::Context) {
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("push");
    push.connect(&master.endpoint()).expect("connect");
    let mut node = SimNode::new(id, now_ms()).expect("node");
    let body = vmwatch_tests::sim::started(uuid, name, now_ms());
    push.send_multipart(node.message_now(body), 0)
        .expect("send");
    (push, ctx)
}

#[test]
fn the_loopback_api_refuses_foreign_hosts_and_tokenless_writes() {
    let dir = temp_dir("csrf");
    let master = Master::start(&dir, &[("http_hosts", "panel.example.net")]).expect("master");
    let port = master.http_port;
    // DNS rebinding: the attacker's name pointed at 127.0.0.1.
    let (status, body) = raw_http(
        &master,
        &format!("GET /api/v1/vms HTTP/1.1\r\nHost: attacker.example:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("http_hosts"), "{body}");
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "panel.example.net".into(),
    ] {
        let (status, body) = raw_http(
            &master,
            &format!("GET /api/v1/vms HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "{host}: {body}");
    }
    // A cross-site form POST (no token can be sent by a plain form): refused, nothing changed.
    let form = "id=1";
    let (status, body) = raw_http(
        &master,
        &format!(
            "POST /api/v1/dead-letters/1/retry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://attacker.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("api_token"), "{body}");
    let (status, _) = raw_http(
        &master,
        &format!("POST /api/v1/nodes/hv-x/enrollment HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 403);
}

#[test]
fn the_webhook_follows_no_redirect() {
    // The other host a redirect points at: it must receive nothing.
    let elsewhere = PanelReceiver::start(0, b"panel-key-redirect-0123").expect("receiver");
    let redirector = TcpListener::bind("127.0.0.1:0").expect("bind");
    let redirect_url = format!(
        "http://127.0.0.1:{}/hook",
        redirector.local_addr().expect("addr").port()
    );
    let target = format!("{}/stolen", elsewhere.url());
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    {
        let answered = answered.clone();
        std::thread::spawn(move || {
            for conn in redirector.incoming().flatten() {
                let mut conn = conn;
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 65536];
                let _ = conn.read(&mut buf);
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = conn.write_all(
                    format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
    }
    let dir = temp_dir("redirect");
    let master = Master::start(
        &dir,
        &[
            ("panel_url", &redirect_url),
            ("panel_secret", "panel-key-redirect-0123"),
        ],
    )
    .expect("master");
    let _sent = send_started(
        &master,
        "hv-redirect",
        "11111111-2222-4333-8444-555555555555",
        "vm",
    );
    wait_for(Duration::from_secs(10), "two redirected attempts", || {
        (answered.load(std::sync::atomic::Ordering::Relaxed) >= 2).then_some(())
    });
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
    assert!(master.metric("vmwatch_outbox_depth").unwrap_or(0.0) >= 1.0);
    assert!(
        master
            .metric("vmwatch_webhook_deliveries_total")
            .unwrap_or(0.0)
            == 0.0
    );
    let log = master.log_text();
    assert!(
        log.contains("redirect_to=http://127.0.0.1"),
        "the log names the target's host"
    );
    assert!(
        !log.contains("/stolen"),
        "the log shows scheme and host only"
    );
}

#[test]
fn no_secret_of_a_url_reaches_the_log_or_check_config() {
    let dir = temp_dir("masking");
    let master = Master::start(
        &dir,
        &[
            (
                "panel_url",
                "http://hookuser:pw-in-panel-url@127.0.0.1:9/hook?token=tok-in-query",
            ),
            ("panel_secret", "panel-key-masking-0123"),
            ("bus_url", "amqp://guest:pw-in-bus-url@127.0.0.1:9/"),
        ],
    )
    .expect("master");
    let (code, out, err) = master.command(&["--check-config"]).expect("check-config");
    assert_eq!(code, 0, "{err}");
    for secret in [
        "pw-in-panel-url",
        "tok-in-query",
        "pw-in-bus-url",
        "panel-key-masking",
    ] {
        assert!(
            !out.contains(secret),
            "--check-config shows {secret}:\n{out}"
        );
    }
    // The bus fails against the closed port and says so.
    wait_for(Duration::from_secs(10), "the bus failure logged", || {
        master
            .log_text()
            .contains("event bus unavailable")
            .then_some(())
    });
    let _sent = send_started(
        &master,
        "hv-mask",
        "11111111-2222-4333-8444-666666666666",
        "vm\" forged=yes",
    );
    // The entry's journal line (logged after its commit), then a failed delivery of it.
    let line = wait_for(Duration::from_secs(10), "the event's journal line", || {
        master
            .log_text()
            .lines()
            .find(|l| l.contains("journal") && l.contains("forged"))
            .map(str::to_owned)
    });
    wait_for(Duration::from_secs(10), "a webhook failure logged", || {
        master
            .log_text()
            .contains("webhook delivery failed")
            .then_some(())
    });
    let log = master.log_text();
    for secret in ["pw-in-panel-url", "tok-in-query", "pw-in-bus-url"] {
        assert!(!log.contains(secret), "the log shows {secret}");
    }
    // A VM name cannot add a field to the journal line: it is quoted and its quote escaped.
    assert!(line.contains(r#"name="vm\" forged=yes""#), "{line}");

    // A malformed bus_url: the error names the key, not the password.
    let bad = temp_dir("masking-bad");
    let conf = bad.join("master.conf");
    vmwatch_tests::product::write_private(
        &conf,
        &format!(
            "secret=0123456789abcdef0\ndb_path={}\nbus_url=amqp:guest:pw-in-bad-url@127.0.0.1:5672/\n",
            bad.join("m.db").display()
        ),
    )
    .expect("conf");
    let out = std::process::Command::new(vmwatch_tests::product::bin("vmwatch-master"))
        .args(["--config", &conf.display().to_string(), "--check-config"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(78));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("bus_url") && !text.contains("pw-in-bad-url"),
        "{text}"
    );
}

/// Every series `/metrics` serves is in docs/API.md's table (issue 27, item 7).
#[test]
fn every_metric_served_is_documented() {
    let dir = temp_dir("metrics-doc");
    let master = Master::start(&dir, &[]).expect("master");
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("push");
    push.connect(&master.endpoint()).expect("connect");
    let mut node = SimNode::new("hv-metrics", now_ms()).expect("node");
    push.send_multipart(node.message_now(vmwatch_tests::sim::heartbeat()), 0)
        .expect("send");
    wait_for(Duration::from_secs(10), "the node's gauges", || {
        master
            .metrics()
            .ok()?
            .contains("vmwatch_node_agent_sent_messages{")
            .then_some(())
    });
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/API.md"))
        .expect("API.md");
    let text = master.metrics().expect("metrics");
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(families.len() > 30, "{families:?}");
    let missing: Vec<&&str> = families
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}")))
        .collect();
    assert!(missing.is_empty(), "served but not in API.md: {missing:?}");
    // Every state label has a series, zeros included.
    for state in ["running", "shutoff", "unknown", "other"] {
        assert!(
            text.contains(&format!("vmwatch_vms{{state=\"{state}\"}} ")),
            "{state}"
        );
    }
}

/// A config holding secrets that other users can read is refused with status 78 and the
/// command that fixes it, as ssh refuses a readable private key (issue 24, item 7).
#[test]
fn a_config_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("readable");
    let conf = dir.join("master.conf");
    std::fs::write(
        &conf,
        format!(
            "secret=0123456789abcdef0\ndb_path={}\nlog_file=-\n",
            dir.join("m.db").display()
        ),
    )
    .expect("conf");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = || {
        std::process::Command::new(vmwatch_tests::product::bin("vmwatch-master"))
            .args(["--config", &conf.display().to_string(), "--check-config"])
            .output()
            .expect("run")
    };
    let out = run();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod o-rwx {}", conf.display())),
        "{err}"
    );
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(run().status.code(), Some(0));
    // The same for node_secrets_file.
    let secrets = dir.join("node-secrets");
    std::fs::write(&secrets, "hv1=aaaaaaaaaaaaaaaaaaaa\n").expect("secrets");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::write(
        &conf,
        format!(
            "secret=0123456789abcdef0\ndb_path={}\nlog_file=-\nnode_secrets_file={}\n",
            dir.join("m.db").display(),
            secrets.display()
        ),
    )
    .expect("conf");
    let out = run();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod o-rwx"),
        "{out:?}"
    );
}

/// Node- and client-supplied numbers cannot overflow the master (issue 24, item 9): a huge API
/// offset is a 400, and a node whose sequence jumps by nearly 2^64 twice keeps a saturated
/// `lost` count instead of wrapping or crashing.
#[test]
fn huge_numbers_do_not_overflow() {
    let dir = temp_dir("overflow");
    let master = Master::start(&dir, &[]).expect("master");
    let (status, body) = master
        .get_raw("/api/v1/vms?offset=18446744073709551615")
        .expect("GET");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("offset"), "{body}");
    assert_eq!(
        master
            .get_raw("/api/v1/vms?offset=9223372036854775807")
            .expect("GET")
            .0,
        200
    );
    let ctx = zmq::Context::new();
    let push = curve_push(&ctx).expect("push");
    push.connect(&master.endpoint()).expect("connect");
    let hb = vmwatch_tests::sim::heartbeat;
    // Three boots whose first message has the largest seq: 3 × (2^63 − 2) messages "lost",
    // past 2^64.
    let id = vmwatch_common::protocol::NodeId::parse("hv-overflow").expect("id");
    let key = vmwatch_tests::sim::node_key("hv-overflow");
    for boot in 0..3u64 {
        let payload = vmwatch_common::protocol::Payload {
            boot: format!("overflow-boot-{boot}"),
            boot_ts: now_ms(),
            seq: i64::MAX as u64,
            ts: now_ms(),
            body: hb(),
        };
        push.send_multipart(
            vmwatch_common::protocol::encode(key.as_bytes(), &id, &payload),
            0,
        )
        .expect("send");
    }
    let n = wait_for(Duration::from_secs(10), "three gaps", || {
        master.node("hv-overflow").filter(|n| n["gaps"] == 3)
    });
    assert_eq!(n["lost"].as_u64(), Some(i64::MAX as u64), "{n}");
    // Still running, not a zombie (a reaped-later exit keeps /proc but loses VmRSS).
    let pid = master.pid().expect("pid");
    assert!(
        vmwatch_tests::product::rss_kib(pid).is_some(),
        "the master exited"
    );
    assert_eq!(master.get_raw("/healthz").expect("healthz").0, 200);
}
