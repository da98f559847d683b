//! The status page in a real browser: headless Chromium (Debian's `chromium`) driven by
//! `tests/browser/statuspage.mjs` (playwright-core), against the real master and node and a
//! private libvirtd with a real guest. Every wait is a poll with a deadline.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmwatch_common::protocol::{self, Body, DomainState, NodeId, Payload, Snapshot};
use vmwatch_common::time::now_ms;
use vmwatch_tests::browser::{require_browser_env, Driver};
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;
use vmwatch_tests::product::{temp_dir, wait_for, Master, Node};
use vmwatch_tests::require_root_env;

/// `target/<name>`: where the screenshots go.
fn target_file(name: &str) -> PathBuf {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    target.canonicalize().unwrap_or(target).join(name)
}

/// Asserts the driver answered `event`, with the whole answer in the message.
fn expect_event(answer: &Value, event: &str, what: &str) {
    assert_eq!(answer["event"], event, "{what}: {answer}");
}

/// Sets filters like a user and checks the request the page made for them.
fn filter(driver: &mut Driver, filters: Value, query_has: &[&str], query_lacks: &[&str]) {
    let mut cmd = filters.clone();
    cmd["cmd"] = json!("filter");
    let answer = driver
        .command(&cmd, Duration::from_secs(15))
        .expect("filter command");
    expect_event(&answer, "filtered", &format!("filter {filters}"));
    let request = answer["request"].as_str().unwrap_or_default();
    for part in query_has {
        assert!(
            request.split(['?', '&']).any(|p| p == *part),
            "filter {filters}: the page asked {request}, without {part}"
        );
    }
    for part in query_lacks {
        assert!(
            !request.contains(part),
            "filter {filters}: the page asked {request}, with {part}"
        );
    }
}

fn wait_row(driver: &mut Driver, cmd: Value, what: &str) -> Value {
    let mut cmd = cmd;
    cmd["cmd"] = json!("wait");
    let timeout_ms = cmd["timeout_ms"].as_u64().unwrap_or(10_000);
    let answer = driver
        .command(&cmd, Duration::from_millis(timeout_ms + 15_000))
        .expect("wait command");
    expect_event(&answer, "matched", what);
    answer
}

#[test]
fn status_page_follows_a_real_guest_without_reloading() {
    if !require_root_env("status_page_follows_a_real_guest_without_reloading")
        || !require_browser_env("status_page_follows_a_real_guest_without_reloading")
    {
        return;
    }
    let t_start = Instant::now();
    let lv = PrivateLibvirtd::start("browser").expect("private libvirtd");
    let uuid = lv
        .start_guest("browser-idle", GuestKind::Idle)
        .expect("idle guest");
    let dir = temp_dir("browser");
    let master = Master::start(&dir, &[("idle_windows", "1")]).expect("master");
    let _node = Node::start(
        &dir,
        "browser",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "2")],
    )
    .expect("node");

    let screenshot = target_file("statuspage.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Driver::start(
        &master.url("/"),
        &screenshot,
        &[&uuid],
        None,
        &dir.join("driver.stderr"),
    )
    .expect("browser driver");

    // The guest's row appears (the driver waits up to 60 s for it).
    let ready = driver
        .next_event(Duration::from_secs(90))
        .expect("page ready");
    expect_event(&ready, "ready", "the guest's row on the page");
    let row = &ready["rows"][&uuid];
    assert_eq!(row["node"], "browser", "{ready}");
    assert_eq!(row["name"], "browser-idle", "{ready}");
    eprintln!(
        "page showed the guest after {:.1?}: {row}",
        t_start.elapsed()
    );

    // Two running stats windows of 2 s with no traffic and no writes flag it idle on both.
    let idle = wait_row(
        &mut driver,
        json!({"uuid": uuid, "state": "running", "warnings": ["idle-net", "idle-disk"], "timeout_ms": 30_000}),
        "the idle warnings on the running guest",
    );
    eprintln!(
        "idle warnings shown {} ms into the wait",
        idle["elapsed_ms"]
    );
    // The page agrees with the API.
    let api_row = master.vm_row(&uuid, "browser").expect("API row");
    assert_eq!(api_row["usage"]["net"]["idle"], true, "{api_row}");
    assert_eq!(api_row["usage"]["disk"]["idle"], true, "{api_row}");

    // Suspended behind the page's back: it shows `paused` by itself, without a reload.
    lv.virsh(&["suspend", "browser-idle"])
        .expect("virsh suspend");
    let t_suspend = Instant::now();
    let paused = wait_row(
        &mut driver,
        json!({"uuid": uuid, "state": "paused", "warnings": ["idle-net"], "timeout_ms": 20_000}),
        "paused on the page after virsh suspend",
    );
    eprintln!(
        "page showed paused {:.1?} after virsh suspend returned: {}",
        t_suspend.elapsed(),
        paused["row"]
    );
    assert!(
        paused["info"]["marker"].is_string(),
        "the page was reloaded: {paused}"
    );
    assert_eq!(paused["info"]["navigations"], 1, "{paused}");

    // Filters map onto the API's server-side filters.
    filter(
        &mut driver,
        json!({"state": "paused"}),
        &["state=paused", "offset=0"],
        &["idle=", "duplicate="],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "state": "paused"}),
        "row kept by state=paused",
    );
    filter(
        &mut driver,
        json!({"state": "running"}),
        &["state=running"],
        &[],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "absent": true}),
        "row hidden by state=running",
    );
    filter(
        &mut driver,
        json!({"state": "", "warning": "idle"}),
        &["idle=true"],
        &["state=", "duplicate="],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "warnings": ["idle-net"]}),
        "row kept by idle=true",
    );
    filter(
        &mut driver,
        json!({"warning": "duplicate"}),
        &["duplicate=true"],
        &["idle="],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "absent": true}),
        "row hidden by duplicate=true",
    );
    filter(
        &mut driver,
        json!({"warning": "", "node": "browser"}),
        &["node=browser"],
        &["idle=", "duplicate="],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "state": "paused", "warnings": ["idle-net", "idle-disk"]}),
        "row back with node=browser",
    );

    let shot = driver
        .command(&json!({"cmd": "screenshot"}), Duration::from_secs(30))
        .expect("screenshot");
    expect_event(&shot, "screenshot", "screenshot");
    let png = std::fs::read(&screenshot).expect("screenshot file");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {}",
        screenshot.display()
    );
    println!("screenshot: {}", screenshot.display());

    let (result, status) = driver.finish(Duration::from_secs(30)).expect("finish");
    assert!(
        status.success() && result["ok"] == true,
        "browser checks failed ({status}): {result}"
    );
    assert_eq!(result["loads"], 1, "{result}");
    // The journal is followed with after=<last id>, never read from the start again.
    let afters: Vec<u64> = result["events_after"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    assert!(
        afters.len() > 3
            && afters.windows(2).all(|w| w[0] <= w[1])
            && afters.last().is_some_and(|a| *a > 0),
        "the journal was not followed incrementally: after = {afters:?}"
    );
    eprintln!(
        "browser test done in {:.1?}: {} API requests, no console error",
        t_start.elapsed(),
        result["api_requests"]
    );
}

/// With `api_token`, the page asks for the token, keeps it in sessionStorage and sends it on
/// every request; when the master goes away the indicator says so, and recovers with it.
/// Pages through 120 VMs. Needs no libvirtd: one simulated node sends a snapshot.
#[test]
fn status_page_asks_for_the_api_token() {
    if !require_browser_env("status_page_asks_for_the_api_token") {
        return;
    }
    let token = "page-token-0123456789";
    let dir = temp_dir("browser-token");
    let mut master = Master::start(&dir, &[("api_token", token)]).expect("master");
    // 120 VMs: two pages of 100. The first by name is the one the driver looks for.
    let uuids: Vec<String> = (0..120)
        .map(|i| format!("6695eb01-f6a4-4304-89aa-{i:012x}"))
        .collect();
    let uuid = uuids[0].as_str();
    let node = NodeId::parse("hv-token").expect("node id");
    let now = now_ms();
    let payload = Payload {
        boot: format!("browser-token-{now}"),
        boot_ts: now,
        seq: 1,
        ts: now,
        body: Body::Snapshot(Snapshot {
            domains: uuids
                .iter()
                .enumerate()
                .map(|(i, u)| DomainState {
                    uuid: u.clone(),
                    name: format!("token-vm-{i:03}"),
                    state: "running".into(),
                    reason: "booted".into(),
                })
                .collect(),
            hostname: "hv-token".into(),
            libvirt_version: "9.0.0".into(),
        }),
    };
    let ctx = zmq::Context::new();
    let socket = vmwatch_tests::sim::curve_push(&ctx).expect("socket");
    socket.set_linger(5000).expect("linger");
    socket.connect(&master.endpoint()).expect("connect");
    socket
        .send_multipart(
            protocol::encode(
                vmwatch_tests::sim::node_key(node.as_str()).as_bytes(),
                &node,
                &payload,
            ),
            0,
        )
        .expect("send");
    // Without the token the API refuses (the page's first requests will be 401s).
    master.token = None;
    assert_eq!(
        master.get_raw("/api/v1/nodes").expect("GET").0,
        401,
        "the API needs the token"
    );
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    wait_for(Duration::from_secs(10), "the snapshot applied", || {
        agent
            .get(&master.url(&format!("/api/v1/vms/{uuid}")))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .ok()
            .filter(|r| r.status() == 200)
    });

    let screenshot = target_file("statuspage-token.png");
    let mut driver = Driver::start(
        &master.url("/"),
        &screenshot,
        &[uuid],
        Some(token),
        &dir.join("driver.stderr"),
    )
    .expect("browser driver");
    let entered = driver
        .next_event(Duration::from_secs(60))
        .expect("token prompt");
    expect_event(&entered, "token-entered", "the token prompt");
    assert_eq!(entered["status_before"], "API token required", "{entered}");
    let ready = driver
        .next_event(Duration::from_secs(60))
        .expect("page ready");
    expect_event(&ready, "ready", "the VM row after the token");
    assert_eq!(ready["rows"][uuid]["name"], "token-vm-000", "{ready}");

    // Paging: next, prev and the page size are the API's offset and limit.
    let click = |driver: &mut Driver, selector: &str| {
        let answer = driver
            .command(
                &json!({"cmd": "click", "selector": selector}),
                Duration::from_secs(15),
            )
            .expect("click");
        expect_event(&answer, "filtered", selector);
        answer
    };
    let next = click(&mut driver, "#next");
    assert!(
        next["request"]
            .as_str()
            .unwrap_or_default()
            .contains("offset=100"),
        "{next}"
    );
    assert_eq!(
        (&next["range"], &next["rows"], &next["nextDisabled"]),
        (&json!("101–120 of 120"), &json!(20), &json!(true)),
        "{next}"
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "absent": true}),
        "the first VM is not on page 2",
    );
    let prev = click(&mut driver, "#prev");
    assert!(
        prev["request"]
            .as_str()
            .unwrap_or_default()
            .contains("offset=0"),
        "{prev}"
    );
    assert_eq!(prev["range"], "1–100 of 120", "{prev}");
    filter(
        &mut driver,
        json!({"limit": 50}),
        &["limit=50", "offset=0"],
        &[],
    );
    wait_row(
        &mut driver,
        json!({"uuid": uuid, "state": "running"}),
        "the first VM on page 1 of 50",
    );

    // The master goes away: the indicator turns to an error; it comes back: live again, with
    // the token still in use.
    let answer = driver
        .command(
            &json!({"cmd": "tolerate", "pattern": "net::ERR_(CONNECTION_REFUSED|EMPTY_RESPONSE|CONNECTION_RESET)"}),
            Duration::from_secs(10),
        )
        .expect("tolerate");
    expect_event(&answer, "tolerating", "tolerate");
    master.kill9();
    let down = driver
        .command(
            &json!({"cmd": "status", "state": "error", "timeout_ms": 10_000}),
            Duration::from_secs(25),
        )
        .expect("status command");
    expect_event(&down, "matched", "the error indicator with the master down");
    let text = down["info"]["status"].as_str().unwrap_or_default();
    assert!(
        text.contains("master unreachable") && text.contains("last update"),
        "error indicator: {text}"
    );
    master.restart().expect("master restart");
    let up = driver
        .command(
            &json!({"cmd": "status", "state": "ok", "timeout_ms": 10_000}),
            Duration::from_secs(25),
        )
        .expect("status command");
    expect_event(&up, "matched", "the indicator live again");

    let (result, status) = driver.finish(Duration::from_secs(30)).expect("finish");
    eprintln!(
        "token prompt (screenshot {}), then {} API requests (after the prompt all with the token); \
         master down → {:?}; console: {}",
        screenshot.display(),
        result["api_requests"],
        text,
        result["console"]
    );
    assert!(
        status.success() && result["ok"] == true,
        "browser checks failed ({status}): {result}"
    );
    assert!(
        result["expected_401"].as_u64().unwrap_or(0) >= 1,
        "the page did meet the 401 first: {result}"
    );
}

/// The VM detail view in Chromium: a real guest writing to its disk under the background-noise
/// threshold is plotted with the threshold line and its idle periods shaded, a sparkline is in
/// the table; then 14 days of 10-minute windows (2016 points) are read and drawn. Screenshots:
/// `target/statuspage-detail.png` (14 days). No console error.
#[test]
fn the_detail_view_plots_activity_with_the_threshold_and_idle_periods() {
    let test = "the_detail_view_plots_activity_with_the_threshold_and_idle_periods";
    if !require_root_env(test) || !require_browser_env(test) {
        return;
    }
    let lv = PrivateLibvirtd::start("detail").expect("private libvirtd");
    let uuid = lv
        .start_guest("detail-writer", GuestKind::DiskWriter)
        .expect("writer guest");
    let dir = temp_dir("detail");
    let master =
        Master::start(&dir, &[("idle_windows", "2"), ("idle_wr_reqs_max", "5")]).expect("master");
    let _node = Node::start(
        &dir,
        "detail",
        &master.endpoint(),
        &lv.uri(),
        &[("stats_interval", "2")],
    )
    .expect("node");
    let screenshot = target_file("statuspage-detail.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut driver = Driver::start(
        &master.url("/"),
        &screenshot,
        &[&uuid],
        None,
        &dir.join("driver.stderr"),
    )
    .expect("browser driver");
    let ready = driver
        .next_event(Duration::from_secs(90))
        .expect("page ready");
    expect_event(&ready, "ready", "the guest's row on the page");
    // The writer's ≈ 2 writes a window are under 5: idle on the disk after 2 windows.
    wait_for(Duration::from_secs(30), "idle.disk in the API", || {
        let row = master.vm_row(&uuid, "detail")?;
        (row["usage"]["disk"]["idle"] == true).then_some(())
    });
    let detail = driver
        .command(
            &json!({"cmd": "detail", "uuid": uuid, "points": 3, "idle": true, "timeout_ms": 30_000}),
            Duration::from_secs(45),
        )
        .expect("detail command");
    expect_event(&detail, "detail", "the detail view of the real guest");
    eprintln!("detail of the real guest: {}", detail["info"]);
    assert!(detail["info"]["idle_disk"].as_u64() >= Some(1), "{detail}");

    // 14 days of 10-minute windows of this VM, written as the master writes them: a quiet
    // guest (a few packets, no writes) with a busy afternoon a day.
    let day = 86_400_000u64;
    let end = now_ms() - 3_600_000;
    let mut store = vmwatch_master::store::Store::open(&master.database).expect("db");
    let history: Vec<vmwatch_master::rules::Effect> = (0..2016u64)
        .map(|i| {
            let ts = end - 14 * day + (i + 1) * 600_000;
            let busy = i % 144 >= 84 && i % 144 < 96;
            let n = |quiet: u64, loud: u64| Some(if busy { loud } else { quiet });
            vmwatch_master::rules::Effect::Activity {
                node_id: "detail".into(),
                uuid: uuid.clone(),
                point: vmwatch_master::activity::Point {
                    ts,
                    window_ms: 600_000,
                    deltas: [
                        n(3, 900),
                        n(4, 1200),
                        n(180, 90_000),
                        n(240, 400_000),
                        n(0, 30),
                        n(0, 400),
                        n(0, 120_000),
                        n(0, 1_600_000),
                        n(5, 9000),
                    ],
                    idle_net: !busy,
                    idle_disk: !busy,
                },
            }
        })
        .collect();
    store.commit(&history).expect("history");
    drop(store);
    let detail = driver
        .command(
            &json!({"cmd": "detail", "uuid": uuid, "points": 1000, "idle": true, "timeout_ms": 30_000}),
            Duration::from_secs(45),
        )
        .expect("detail command");
    expect_event(&detail, "detail", "the detail view of 14 days");
    let info = &detail["info"];
    eprintln!(
        "detail view of 14 days of 10-minute windows: {} points drawn in {} ms (3 API reads and the SVG); {}",
        info["points"], info["render_ms"], info["summary"]
    );
    assert!(
        info["idle_net"].as_u64() >= Some(14),
        "a quiet stretch a day: {info}"
    );
    let shot = driver
        .command(&json!({"cmd": "screenshot"}), Duration::from_secs(30))
        .expect("screenshot");
    expect_event(&shot, "screenshot", "the screenshot");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 10_000));
    eprintln!("screenshot: {}", screenshot.display());
    let (result, status) = driver.finish(Duration::from_secs(30)).expect("finish");
    assert!(status.success(), "the page had problems: {result}");
}
