//! Runs the real `vmwatch-master` and `vmwatch-node` binaries as processes, with configs in a
//! private directory, and talks to the master's HTTP API.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// The shared secret the tests use (with `$`, `#` and `=` to prove they are kept literally).
pub const SECRET: &str = "test-secret-$HOME#=0123456789";

/// Where the workspace's binaries are: `VMWATCH_BIN_DIR`, else next to the test executable's
/// `deps/` directory (`target/<profile>/`). `VMWATCH_NODE_BIN`, when set, is the node's path
/// (the benchmarks measure the node the packages ship, built with the `release-node` profile).
pub fn bin(name: &str) -> PathBuf {
    if name == "vmwatch-node" {
        if let Some(path) = std::env::var_os("VMWATCH_NODE_BIN").filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
    }
    if let Ok(dir) = std::env::var("VMWATCH_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current executable");
    // A binary of this crate sits next to the others; a test sits one level down in deps/.
    let here = exe.parent().expect("executable directory");
    if here.join(name).exists() {
        return here.join(name);
    }
    here.parent()
        .expect("target/<profile>/deps/<test>")
        .join(name)
}

/// Whether Debian's `/usr/bin/python3` can import `module`. When it cannot, a test that needs
/// it fails under CI (scripts/install-deps.sh installs it) and skips loudly otherwise.
pub fn require_python_module(test: &str, module: &str) -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let missing = if ok {
        Vec::new()
    } else {
        vec![format!("/usr/bin/python3 with {module}")]
    };
    crate::ready_or_skip(test, &missing, "run scripts/install-deps.sh as root")
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A fresh directory under the system temp dir, removed when the guard drops, unless the thread
/// is panicking (a failed test keeps its logs and databases, and says where) or
/// `VMWATCH_KEEP_TEST_DIRS=1`. Declared before the processes that write into it, it outlives
/// them: locals drop in reverse order, and so do the bindings of one pattern (write the guard
/// first in `let Setup { _dir, .. }`), while a struct's fields drop in declaration order (put it
/// last). A run of the whole suite once left 10 GB behind in /tmp.
pub fn temp_dir(name: &str) -> Scratch {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("vmwatch-e2e-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    Scratch(dir)
}

/// A test's directory (see [`temp_dir`]); derefs to its path.
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep = std::env::var("VMWATCH_KEEP_TEST_DIRS").is_ok_and(|v| v == "1");
        if std::thread::panicking() || keep {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for_every(Duration::from_millis(20), timeout, what, f)
}

/// [`wait_for`] polling every `period`: benchmarks poll the master's /metrics gently, since a
/// scrape of 1,000 nodes' gauges every 20 ms took 5 % of its CPU.
pub fn wait_for_every<T>(
    period: Duration,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(period);
    }
}

fn spawn(
    binary: &Path,
    config: &Path,
    log_dir: &Path,
    name: &str,
    env: &[(String, String)],
) -> Result<Child> {
    let out = std::fs::File::create(log_dir.join(format!("{name}.stdout")))?;
    let err = std::fs::File::create(log_dir.join(format!("{name}.stderr")))?;
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {}", binary.display()))
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Sends SIGTERM and waits (bounded) for the exit status.
fn terminate(child: &mut Child, timeout: Duration) -> Result<std::process::ExitStatus> {
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "process {} did not exit within {timeout:?} of SIGTERM",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a config file as the daemons require it: readable by its owner only (they refuse a
/// file holding secrets that other users can read).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// Extra `KEY=VALUE` lines for a config; a key given here replaces the default.
pub type Extra<'a> = &'a [(&'a str, &'a str)];

/// `defaults` overridden by `extra`, as config file text.
fn config_text(defaults: &[(&str, String)], extra: Extra<'_>) -> String {
    let mut text = String::new();
    for (k, v) in defaults {
        if !extra.iter().any(|(e, _)| e == k) {
            text.push_str(&format!("{k}={v}\n"));
        }
    }
    // A key given twice in `extra`: the last one wins.
    for (i, (k, v)) in extra.iter().enumerate() {
        if !extra[i + 1..].iter().any(|(e, _)| e == k) {
            text.push_str(&format!("{k}={v}\n"));
        }
    }
    text
}

/// A running master.
pub struct Master {
    pub dir: PathBuf,
    pub zmq_port: u16,
    pub http_port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Extra environment of the master process (kept across restarts).
    pub env: Vec<(String, String)>,
    /// The `api_token` of its configuration, sent with every request when set.
    pub token: Option<String>,
    /// Its `database=` (tests that read or change the database behind its back open this).
    pub database: vmwatch_master::store::Database,
    child: Option<Child>,
}

impl Master {
    /// Writes a config in `dir` and starts the master; waits until `/healthz` answers.
    pub fn start(dir: &Path, extra: Extra<'_>) -> Result<Master> {
        Master::start_with_env(dir, extra, &[])
    }

    /// [`Master::start`] with extra environment variables for the master process.
    pub fn start_with_env(dir: &Path, extra: Extra<'_>, env: &[(&str, &str)]) -> Result<Master> {
        let zmq_port = free_port();
        let http_port = free_port();
        let config = dir.join("master.conf");
        let log = dir.join("master.log");
        // The suites' backend: SQLite in the test's directory, or a new database in the
        // process's private PostgreSQL cluster (`VMWATCH_TEST_DATABASE=postgres`). A test that
        // names its own `db_path` keeps it.
        let own = |key: &str| extra.iter().rev().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let (database, password_file) = match (own("db_path"), own("database")) {
            (Some(p), _) => (format!("sqlite://{p}"), String::new()),
            (None, Some(url)) => (
                url.to_owned(),
                own("database_password_file").unwrap_or_default().to_owned(),
            ),
            (None, None) if crate::pg::selected() => {
                let cluster = crate::pg::cluster()?;
                (
                    cluster.create_database("master")?,
                    cluster.password_file.display().to_string(),
                )
            }
            (None, None) => (
                format!("sqlite://{}", dir.join("master.db").display()),
                String::new(),
            ),
        };
        let extra: Vec<(&str, &str)> = extra
            .iter()
            .filter(|(k, _)| *k != "db_path")
            .copied()
            .collect();
        let extra = &extra[..];
        let defaults = [
            ("listen", format!("tcp://127.0.0.1:{zmq_port}")),
            ("secret", SECRET.to_owned()),
            ("database", database.clone()),
            ("database_password_file", password_file.clone()),
            ("http_listen", format!("127.0.0.1:{http_port}")),
            ("log_file", log.display().to_string()),
            ("log_level", "debug".to_owned()),
            // The suites written before per-node keys run their nodes on the fleet key, and
            // their stats windows of a second or two are each a point; the identity suite
            // sets both to what a new install has.
            ("allow_fleet_transport", "yes".to_owned()),
            ("activity_min_window", "0".to_owned()),
        ];
        let text = config_text(&defaults, extra);
        write_private(&config, &text)?;
        let mut m = Master {
            dir: dir.to_owned(),
            zmq_port,
            http_port,
            config,
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            token: extra
                .iter()
                .rev()
                .find(|(k, _)| *k == "api_token")
                .map(|(_, v)| v.to_string()),
            database: vmwatch_master::store::Database::parse(
                &database,
                Some(std::path::Path::new(&password_file)).filter(|_| !password_file.is_empty()),
            )
            .map_err(anyhow::Error::msg)?,
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        self.child = Some(spawn(
            &bin("vmwatch-master"),
            &self.config,
            &self.dir,
            "master",
            &self.env,
        )?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "master exited at start with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if self
                .get_raw("/healthz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "master did not answer /healthz within 20 s; log:\n{}",
            self.log_text()
        )
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.zmq_port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// GET returning (status, body); transport errors are errors.
    pub fn get_raw(&self, path: &str) -> Result<(u16, String)> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let mut req = agent.get(&self.url(path));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        match req.call() {
            Ok(r) => Ok((r.status(), r.into_string()?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
            Err(e) => Err(anyhow!("GET {path}: {e}")),
        }
    }

    /// GET a JSON document that must answer 200.
    pub fn get(&self, path: &str) -> Result<Value> {
        let (status, body) = self.get_raw(path)?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = self.get_raw("/metrics")?;
        if status != 200 {
            bail!("GET /metrics: HTTP {status}");
        }
        Ok(body)
    }

    /// The value of one sample line of `/metrics` (exact series name with labels).
    pub fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics()?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .ok_or_else(|| anyhow!("series {series} not in /metrics"))?
            .trim()
            .parse()
            .map_err(|e| anyhow!("series {series}: {e}"))
    }

    /// A metric's value, 0 when the series is not (yet) there.
    pub fn metric_or_zero(&self, series: &str) -> f64 {
        self.metric(series).unwrap_or(0.0)
    }

    /// `vmwatch_messages_rejected_total{reason="…"}`, 0 when not there.
    pub fn rejected(&self, reason: &str) -> f64 {
        self.metric_or_zero(&format!(
            "vmwatch_messages_rejected_total{{reason=\"{reason}\"}}"
        ))
    }

    /// Whether the master's rows of `node` are exactly what `lv` lists.
    pub fn matches_libvirt(&self, lv: &crate::libvirtd::PrivateLibvirtd, node: &str) -> bool {
        match (self.vms_of(node), lv.inventory()) {
            (Ok(rows), Ok(listed)) => rows == listed,
            _ => false,
        }
    }

    /// Waits until the master's rows of `node` are exactly what `lv` lists.
    pub fn wait_matches_libvirt(
        &self,
        lv: &crate::libvirtd::PrivateLibvirtd,
        node: &str,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        while !self.matches_libvirt(lv, node) {
            assert!(
                Instant::now() < deadline,
                "inventory of {node} did not match libvirt within {timeout:?}:\n libvirt: {:?}\n master:  {:?}",
                lv.inventory(),
                self.vms_of(node)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The master's view of one node's VMs: (uuid, name, state), sorted by uuid.
    pub fn vms_of(&self, node: &str) -> Result<Vec<(String, String, String)>> {
        let v = self.get(&format!("/api/v1/vms?node={node}&limit=1000"))?;
        let mut out: Vec<(String, String, String)> = v["vms"]
            .as_array()
            .ok_or_else(|| anyhow!("no vms array"))?
            .iter()
            .map(|r| {
                (
                    r["uuid"].as_str().unwrap_or_default().to_owned(),
                    r["name"].as_str().unwrap_or_default().to_owned(),
                    r["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The row of one VM on one node, if the master has one.
    pub fn vm_row(&self, uuid: &str, node: &str) -> Option<Value> {
        let v = self.get(&format!("/api/v1/vms/{uuid}")).ok()?;
        v["rows"]
            .as_array()?
            .iter()
            .find(|r| r["node_id"] == node)
            .cloned()
    }

    /// The state of one VM on one node, if the master has a row.
    pub fn vm_state(&self, uuid: &str, node: &str) -> Option<String> {
        let v = self.get(&format!("/api/v1/vms/{uuid}")).ok()?;
        v["rows"]
            .as_array()?
            .iter()
            .find(|r| r["node_id"] == node)
            .and_then(|r| r["state"].as_str())
            .map(str::to_owned)
    }

    /// One node's row from `/api/v1/nodes`.
    pub fn node(&self, node: &str) -> Option<Value> {
        let v = self.get("/api/v1/nodes").ok()?;
        v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["node_id"] == node)
            .cloned()
    }

    /// Journal entries of a type (all of them, paging through).
    pub fn events(&self, query: &str) -> Result<Vec<Value>> {
        let mut after = 0i64;
        let mut out = Vec::new();
        loop {
            let v = self.get(&format!("/api/v1/events?after={after}&limit=1000&{query}"))?;
            let page = v["events"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return Ok(out);
            }
            after = page.last().and_then(|e| e["id"].as_i64()).unwrap_or(after);
            out.extend(page);
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again with the same config, database and ports.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Result<i32> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("master not running"))?;
        let status = terminate(&mut c, Duration::from_secs(15))?;
        Ok(status.code().unwrap_or(-1))
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
    }

    /// Runs `vmwatch-master --config <this master's config> ARGS…` (a one-shot command such as
    /// `enroll N`) and returns (exit code, stdout, stderr).
    pub fn command(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(bin("vmwatch-master"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run vmwatch-master")?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Enrolls `node` with the CLI and waits until the running master has taken it up (its
    /// `enrolled` journal entry: the core writes it once the registry the ZAP handler reads
    /// holds the node, within the master's 0.2 s poll). Panics if either fails.
    pub fn enroll(&self, node: &str) -> String {
        let out = match self.command(&["enroll", node]) {
            Ok((0, out, _)) => out,
            other => panic!("vmwatch-master enroll {node}: {other:?}"),
        };
        if self.child.is_some() {
            wait_for(
                Duration::from_secs(5),
                &format!("{node}'s enrollment taken up"),
                || {
                    self.events(&format!("type=node&node={node}"))
                        .ok()?
                        .iter()
                        .any(|e| e["event"] == "enrolled")
                        .then_some(())
                },
            );
        }
        out
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running node agent.
pub struct Node {
    pub dir: PathBuf,
    pub node_id: String,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Writes a config and starts the agent.
    pub fn start(
        dir: &Path,
        node_id: &str,
        connect: &str,
        libvirt_uri: &str,
        extra: Extra<'_>,
    ) -> Result<Node> {
        let config = dir.join(format!("node-{node_id}.conf"));
        let log = dir.join(format!("node-{node_id}.log"));
        let mut defaults = vec![
            ("connect", connect.to_owned()),
            ("node_id", node_id.to_owned()),
            ("libvirt_uri", libvirt_uri.to_owned()),
            ("secret", crate::sim::node_key(node_id)),
            ("master_key", crate::sim::master_key()),
            ("log_file", log.display().to_string()),
            ("log_level", "debug".to_owned()),
        ];
        // Its own key when the test gives one (an enrolled node), else the fleet key.
        if !extra.iter().any(|(k, _)| *k == "node_key") {
            defaults.push(("transport_key", crate::sim::transport_key()));
        }
        Node::launch(dir, node_id, config, log, &config_text(&defaults, extra))
    }

    /// Starts an agent whose identity and key lines are `lines` exactly as the master's
    /// enrollment printed them, plus the libvirt URI and a log in `dir`.
    pub fn start_enrolled(
        dir: &Path,
        node_id: &str,
        lines: &str,
        libvirt_uri: &str,
    ) -> Result<Node> {
        let config = dir.join(format!("node-{node_id}.conf"));
        let log = dir.join(format!("node-{node_id}.log"));
        let text = format!(
            "{lines}libvirt_uri={libvirt_uri}\nlog_file={}\nlog_level=debug\n",
            log.display()
        );
        Node::launch(dir, node_id, config, log, &text)
    }

    /// Writes `text` as the agent's config (owner-only) and starts it.
    fn launch(
        dir: &Path,
        node_id: &str,
        config: PathBuf,
        log: PathBuf,
        text: &str,
    ) -> Result<Node> {
        write_private(&config, text)?;
        let mut n = Node {
            dir: dir.to_owned(),
            node_id: node_id.to_owned(),
            config,
            log,
            child: None,
        };
        n.spawn()?;
        Ok(n)
    }

    fn spawn(&mut self) -> Result<()> {
        self.child = Some(spawn(
            &bin("vmwatch-node"),
            &self.config,
            &self.dir,
            &format!("node-{}", self.node_id),
            &[],
        )?);
        Ok(())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Result<i32> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("node not running"))?;
        let status = terminate(&mut c, Duration::from_secs(15))?;
        Ok(status.code().unwrap_or(-1))
    }

    /// SIGKILL (no `bye`) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("node already running");
        }
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Resident memory of a process in KiB (`VmRSS`), if it exists.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// A `NAME:  N kB` line of a /proc file, in KiB.
pub fn proc_kib(path: &str, name: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU use of a process from a start point: `percent()` of one core since `start`.
pub struct CpuMeter {
    pub pid: u32,
    ticks: u64,
    at: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter {
            pid,
            ticks: cpu_ticks(pid).unwrap_or(0),
            at: Instant::now(),
        }
    }

    /// Percent of one core used since `start` (0 once the process is gone).
    pub fn percent(&self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let used = cpu_ticks(self.pid).unwrap_or(0).saturating_sub(self.ticks) as f64 / hz;
        used / self.at.elapsed().as_secs_f64() * 100.0
    }

    pub fn elapsed(&self) -> Duration {
        self.at.elapsed()
    }
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// CPU time (user + system) of a process in clock ticks, if it exists.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

impl Master {
    /// [`Master::start`], but the master process begins with its soft `RLIMIT_NOFILE` at `soft`
    /// (the hard limit kept), as systemd's default `LimitNOFILE=1024:<high>` leaves a service.
    /// It starts once as usual (writing the config and proving it good), then is restarted
    /// with the same config, database and ports under the limit.
    pub fn start_with_nofile(dir: &Path, extra: Extra<'_>, soft: u64) -> Result<Master> {
        use std::os::unix::process::CommandExt;
        let mut m = Master::start(dir, extra)?;
        m.kill9();
        let out = std::fs::File::create(dir.join("master.stdout"))?;
        let err = std::fs::File::create(dir.join("master.stderr"))?;
        let mut cmd = Command::new(bin("vmwatch-master"));
        cmd.arg("--config")
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: between fork and exec only getrlimit/setrlimit run, both async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                lim.rlim_cur = (soft as libc::rlim_t).min(lim.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        m.child = Some(cmd.spawn().context("spawn vmwatch-master")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "master exited at start with {status}; log:\n{}",
                    m.log_text()
                );
            }
            if m.get_raw("/healthz")
                .map(|(s, _)| s == 200)
                .unwrap_or(false)
            {
                return Ok(m);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("master did not answer /healthz within 20 s under a descriptor limit of {soft}")
    }
}

/// Parses OpenMetrics text with Python's `prometheus_client` parser (a real, independent,
/// strict parser) into (name, labels, value) samples; panics naming the parser's complaint.
pub fn parse_openmetrics(
    text: &str,
) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    use std::io::Write;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, repr(float(s.value))])
print(json.dumps(out))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("parser");
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<(String, std::collections::BTreeMap<String, String>, String)> =
        serde_json::from_slice(&out.stdout).expect("parser output");
    samples
        .into_iter()
        .map(|(n, l, v)| {
            let v = v
                .parse()
                .unwrap_or_else(|_| panic!("sample {n}: value {v}"));
            (n, l, v)
        })
        .collect()
}

/// One raw HTTP/1.x exchange with a server on 127.0.0.1:`port`, from the loopback address
/// `source` (the client socket is bound to it first, so a test can stand for another host):
/// `request` is sent as is, and the answer is read to the end. Returns (status, body).
pub fn raw_http(source: &str, port: u16, request: &str) -> (u16, String) {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let src: std::net::SocketAddrV4 = format!("{source}:0").parse().expect("source address");
    bind(fd.as_raw_fd(), &SockaddrIn::from(src)).expect("bind the source");
    let dst: std::net::SocketAddrV4 = format!("127.0.0.1:{port}").parse().expect("address");
    connect(fd.as_raw_fd(), &SockaddrIn::from(dst)).expect("connect");
    let mut s = std::net::TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}
