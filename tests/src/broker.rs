//! A private RabbitMQ broker per test (Debian's `rabbitmq-server`): its own node name, AMQP and
//! distribution ports on loopback, data directory and Erlang cookie, so any number run at once
//! beside a system broker. [`BusQueue`] is a consumer on it (lapin), for the tests' side.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;

use crate::product::{free_port, wait_for};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
pub const USER: &str = "vmwatch";
/// The broker password: tests check it never reaches the master's log.
pub const PASSWORD: &str = "bus-password-7f3a9c";

/// Whether the broker and the Python client the docs use are installed; CI must not skip.
pub fn require_broker(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new(SERVER).exists() {
        missing.push("rabbitmq-server".to_owned());
    }
    let pika = Command::new("/usr/bin/python3")
        .args(["-c", "import pika"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !pika {
        missing.push("/usr/bin/python3 with pika (python3-pika)".to_owned());
    }
    crate::ready_or_skip(test, &missing, "run scripts/install-deps.sh as root")
}

/// A running private broker. Dropping it kills it and deletes its directory.
pub struct Broker {
    pub port: u16,
    /// With [`Broker::start_tls`]: the `amqps` port, and the CA that signed its certificate
    /// (for `localhost` and `127.0.0.1`).
    pub tls: Option<(u16, PathBuf)>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker in `dir` (created), with user [`USER`]/[`PASSWORD`]; returns once it
    /// accepts AMQP connections.
    pub fn start(dir: &Path) -> Result<Broker> {
        Broker::start_with(dir, false)
    }

    /// [`Broker::start`] with an `amqps` listener too, its certificate signed by a CA made
    /// here with `openssl`.
    pub fn start_tls(dir: &Path) -> Result<Broker> {
        Broker::start_with(dir, true)
    }

    fn start_with(dir: &Path, tls: bool) -> Result<Broker> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let mut conf = format!(
            "listeners.tcp.default = 127.0.0.1:{port}\ndefault_user = {USER}\n\
             default_pass = {PASSWORD}\nloopback_users = none\n"
        );
        let tls = if tls {
            let tls_port = free_port();
            make_certificates(dir, "vmwatch test CA", "DNS:localhost,IP:127.0.0.1")?;
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                d = dir.display()
            ));
            Some((tls_port, dir.join("ca.pem")))
        } else {
            None
        };
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let mut b = Broker {
            port,
            tls,
            dir: dir.to_owned(),
            child: None,
        };
        b.spawn()?;
        Ok(b)
    }

    fn spawn(&mut self) -> Result<()> {
        let d = &self.dir;
        let log = std::fs::File::create(d.join("broker.stdout"))?;
        let mut cmd = Command::new(SERVER);
        cmd.env("HOME", d)
            .env(
                "RABBITMQ_NODENAME",
                format!("vmwatch-test-{}@localhost", self.port),
            )
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: Drop kills the wrapper, the VM and its port programs.
            .process_group(0);
        self.child = Some(cmd.spawn().context("spawn rabbitmq-server")?);
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "rabbitmq-server exited at start with {status}: {}",
                    self.log_tail()
                );
            }
            // A broker still booting can accept the TCP connection and never answer the AMQP
            // handshake, and lapin's connect has no deadline of its own: a CI run once hung
            // here for good. Each attempt gets 5 s.
            if runtime()?.block_on(async {
                let attempt = Connection::connect(&url, ConnectionProperties::default());
                matches!(
                    tokio::time::timeout(Duration::from_secs(5), attempt).await,
                    Ok(Ok(_))
                )
            }) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "rabbitmq-server did not accept AMQP within 90 s: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("broker.stdout")).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    }

    /// `amqp://vmwatch:<password>@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://{USER}:{PASSWORD}@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops it (SIGTERM, bounded wait), keeping its data: durable queues and persistent
    /// messages survive [`Broker::start_again`].
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                kill_group(&child);
                let _ = child.wait();
                bail!("rabbitmq-server did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The wrapper waits for the VM; anything left of the group goes too.
        kill_group(&child);
        Ok(())
    }

    /// Starts it again on the same port and data.
    pub fn start_again(&mut self) -> Result<()> {
        self.spawn()
    }

    /// The Erlang VM's pid (the broker writes it once booted).
    fn vm_pid(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.dir.join("pid")).context("broker pid file")?;
        text.trim()
            .parse()
            .map_err(|_| anyhow!("broker pid file holds {text:?}"))
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    /// Returns once every thread of the VM is stopped: kill(2) returns before they are, and a
    /// publish the caller makes next must not reach a broker still running.
    pub fn pause(&self) -> Result<()> {
        let pid = self.vm_pid()?;
        // SAFETY: kill(2) on the broker's VM, our grandchild.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            if std::time::Instant::now() > deadline {
                bail!("the broker's VM (pid {pid}) did not stop within 5 s of SIGSTOP");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        // SAFETY: as in `pause`.
        unsafe { libc::kill(self.vm_pid()?, libc::SIGCONT) };
        Ok(())
    }
}

/// Whether every thread of `pid` is stopped (state `T` in `/proc/PID/task/*/stat`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}

/// A CA named `ca_name` (`ca.pem`, `ca.key`) and a server certificate (`server.pem`,
/// `server.key`) it signed for `san` (an openssl subjectAltName value, e.g.
/// `DNS:localhost,IP:127.0.0.1`), in `dir`.
pub fn make_certificates(dir: &Path, ca_name: &str, san: &str) -> Result<()> {
    let ca_subject = format!("/CN={ca_name}");
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("run openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            &ca_subject,
        ],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat())?;
    std::fs::write(dir.join("san.ext"), format!("subjectAltName={san}\n"))?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ])
}

fn kill_group(child: &Child) {
    // SAFETY: kill(2) on the process group our child leads; SIGCONT first so a paused VM dies.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGCONT);
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&child);
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// One message as a consumer gets it.
#[derive(Debug, Clone)]
pub struct BusMessage {
    /// `message_id`, parsed (the journal id).
    pub id: i64,
    pub routing_key: String,
    pub body: Value,
    pub content_type: Option<String>,
    pub delivery_mode: Option<u8>,
    pub timestamp: Option<u64>,
}

/// A durable queue bound to the exchange, read by the test.
pub struct BusQueue {
    runtime: tokio::runtime::Runtime,
    _connection: Connection,
    channel: Channel,
    queue: String,
}

impl BusQueue {
    /// Declares the topic exchange as the master does (durable), a durable queue, and binds it
    /// with `binding`.
    pub fn bind(url: &str, exchange: &str, queue: &str, binding: &str) -> Result<BusQueue> {
        let runtime = runtime()?;
        let (connection, channel) = runtime.block_on(async {
            // Bounded, as in `spawn`: lapin's connect has no deadline of its own.
            let connection = tokio::time::timeout(
                Duration::from_secs(30),
                Connection::connect(url, ConnectionProperties::default()),
            )
            .await
            .map_err(|_| anyhow!("no AMQP handshake from {url} within 30 s"))??;
            let channel = connection.create_channel().await?;
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    binding.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, anyhow::Error>((connection, channel))
        })?;
        Ok(BusQueue {
            runtime,
            _connection: connection,
            channel,
            queue: queue.to_owned(),
        })
    }

    /// Every message waiting now, acknowledged.
    pub fn take(&self) -> Result<Vec<BusMessage>> {
        self.runtime.block_on(async {
            let mut out = Vec::new();
            while let Some(m) = self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                let p = &m.delivery.properties;
                let id = p
                    .message_id()
                    .as_ref()
                    .and_then(|s| s.as_str().parse().ok())
                    .ok_or_else(|| anyhow!("a message without a numeric message_id"))?;
                out.push(BusMessage {
                    id,
                    routing_key: m.delivery.routing_key.as_str().to_owned(),
                    body: serde_json::from_slice(&m.delivery.data)?,
                    content_type: p.content_type().as_ref().map(|s| s.as_str().to_owned()),
                    delivery_mode: *p.delivery_mode(),
                    timestamp: *p.timestamp(),
                });
            }
            Ok(out)
        })
    }

    /// Reads until every id of `ids` has arrived (or panics after `timeout`); returns all
    /// messages read, in arrival order.
    pub fn take_ids(&self, ids: &[i64], timeout: Duration) -> Vec<BusMessage> {
        let mut got: Vec<BusMessage> = Vec::new();
        wait_for(
            timeout,
            &format!("journal ids {ids:?} on the queue"),
            || {
                got.extend(self.take().expect("read the queue"));
                ids.iter()
                    .all(|id| got.iter().any(|m| m.id == *id))
                    .then_some(())
            },
        );
        got
    }
}
