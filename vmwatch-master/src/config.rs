//! The master's configuration (`/etc/vmwatch/vmwatch-master.conf`), validated completely before
//! any socket is bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use vmwatch_common::config::{parse_tcp_endpoint, ConfigError, RawConfig, Secret};
use vmwatch_common::keys;
use vmwatch_common::logging;
use vmwatch_common::protocol::NodeId;

pub const DEFAULT_PATH: &str = "/etc/vmwatch/vmwatch-master.conf";

#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub disabled: bool,
    pub listen: String,
    pub secret: Option<Secret>,
    pub node_secrets_file: Option<PathBuf>,
    /// Per-node secrets read from `node_secrets_file`.
    pub node_secrets: HashMap<String, Secret>,
    /// Where the state lives (`database=`, or the older `db_path=`): SQLite or PostgreSQL.
    pub database: crate::store::Database,
    pub http_listen: SocketAddr,
    pub api_token: Option<Secret>,
    /// Where and with which key the webhook notifies the panel (`panel_url`, `panel_secret`).
    pub panel: Option<Panel>,
    /// Where every journal entry is also published (`bus_url`, `bus_exchange`).
    pub bus: Option<Bus>,
    pub node_timeout: u64,
    pub max_clock_skew: u64,
    pub max_message_age: u64,
    pub idle_windows: u32,
    /// A stats window with at most this many transmitted packets counts as quiet.
    pub idle_tx_packets_max: u64,
    /// A stats window with at most this many disk write requests counts as quiet.
    pub idle_wr_reqs_max: u64,
    pub duplicate_grace: u64,
    pub event_retention_days: u64,
    /// Days of activity history kept (0: forever).
    pub activity_retention_days: u64,
    pub max_message_bytes: i64,
    pub node_keys: NodeKeys,
    /// Distinct node ids the master keeps; messages of further new ids are rejected.
    pub max_nodes: usize,
    /// ZeroMQ connections held at once; further ones are closed as they are accepted.
    pub max_connections: usize,
    pub log_file: PathBuf,
    pub log_level: String,
    /// Whether round 2's fleet transport key is still accepted (`allow_fleet_transport`);
    /// unset: yes for a database from before per-node keys, no for a new one.
    pub allow_fleet_transport: Option<bool>,
    /// Node-port connections one peer address may hold (`max_connections_per_address`).
    pub max_connections_per_address: usize,
    /// Host names the HTTP API answers to besides IP addresses and `localhost` (`http_hosts`).
    pub http_hosts: Vec<String>,
    /// The endpoints an enrolled node is told to connect to (`node_connect`).
    pub node_connect: Vec<String>,
    /// Seconds: at most one activity point per VM per this window (`activity_min_window`).
    pub activity_min_window: u64,
    /// Seconds: stats windows of a node closer together are refused (`min_stats_interval`).
    pub min_stats_interval: u64,
    /// VM rows one node may hold (`max_vms_per_node`).
    pub max_vms_per_node: usize,
    /// High availability (SPEC §13): `ha=yes`, this master's `ha_name` and the `ha_lease`.
    pub ha: Option<Ha>,
}

/// A URL as logs and `--check-config` show it: user info and query replaced by `********`, and
/// nothing of a text that does not parse.
pub fn masked_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) => {
            if !u.username().is_empty() || u.password().is_some() {
                let _ = u.set_username("********");
                let _ = u.set_password(None);
            }
            if u.query().is_some() {
                u.set_query(Some("********"));
            }
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(not a URL; not shown)".to_owned(),
    }
}

/// The panel's webhook: its URL and the key that signs every notification (never a node key).
#[derive(Debug, Clone)]
pub struct Panel {
    pub url: String,
    pub secret: Secret,
    /// Entries per POST (`panel_batch_max`): 1 posts each entry as a JSON object; more posts
    /// JSON arrays of up to this many.
    pub batch_max: usize,
}

/// The event bus: the broker and the topic exchange every journal entry is published to.
#[derive(Debug, Clone)]
pub struct Bus {
    pub url: BusUrl,
    pub exchange: String,
}

/// A broker address (`amqp://` or `amqps://`). Its password is never shown: `Display` and
/// `Debug` print it as `********`.
#[derive(Clone)]
pub struct BusUrl {
    uri: lapin::uri::AMQPUri,
    masked: String,
}

impl BusUrl {
    /// Parses `amqp[s]://[user[:password]@]host[:port][/vhost][?heartbeat=…]`. The error never
    /// repeats the URL (it may hold a password).
    pub fn parse(text: &str) -> Result<BusUrl, String> {
        const FORM: &str = "amqp[s]://user:password@host:port/vhost";
        let mut url =
            url::Url::parse(text).map_err(|e| format!("is not a URL ({e}); expected {FORM}"))?;
        if !matches!(url.scheme(), "amqp" | "amqps") {
            return Err(format!(
                "has the scheme `{}`; expected amqp:// or amqps://",
                url.scheme()
            ));
        }
        if url.cannot_be_a_base() {
            return Err(format!(
                "has no `//` after `{}:`; expected {FORM}",
                url.scheme()
            ));
        }
        // The parser's own message may quote the URL, password included: never repeat it.
        let mut uri: lapin::uri::AMQPUri = text
            .parse()
            .map_err(|_| format!("is not an AMQP URL; expected {FORM}"))?;
        // `amqp://host/` is the empty vhost by the AMQP URI spec, which no broker has: it is
        // what pika and Celery users write for the default vhost `/`, so it means that here.
        if url.path() == "/" || url.path().is_empty() {
            uri.vhost = "/".into();
        }
        // amq-protocol-uri takes the host from `Url::domain`, which is empty for an IP
        // address (it would connect to `localhost` instead): take the host as written.
        match url.host_str() {
            Some(host) if !host.is_empty() => {
                uri.authority.host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned()
            }
            _ => return Err("has no host".into()),
        }
        if url.password().is_some() {
            // Only fails for URLs that cannot have a password, which amqp ones can.
            let _ = url.set_password(Some("********"));
        }
        Ok(BusUrl {
            uri,
            masked: url.to_string(),
        })
    }

    /// The parsed address, credentials included, for the connection only.
    pub fn uri(&self) -> &lapin::uri::AMQPUri {
        &self.uri
    }
}

impl std::fmt::Display for BusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked)
    }
}

impl std::fmt::Debug for BusUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked)
    }
}

/// An exchange name the broker accepts for a topic exchange of ours: 1–127 letters, digits,
/// `-`, `_`, `.` or `:`, not in the broker's reserved `amq.` space.
fn exchange_name(v: &str) -> Result<String, String> {
    let ok = (1..=127).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        return Err(format!(
            "`{v}` is not an exchange name (1-127 letters, digits, `-`, `_`, `.`, `:`)"
        ));
    }
    if v.starts_with("amq.") {
        return Err(format!("`{v}` is in the broker's reserved `amq.` names"));
    }
    Ok(v.to_owned())
}

/// Largest `panel_batch_max`: a POST of 1000 bounded entries stays under 1 MiB.
pub const MAX_PANEL_BATCH: u64 = 1000;

/// The panel keys as read, before they are checked together.
struct PanelKeys {
    url: Option<String>,
    secret: Option<Secret>,
    batch_max: usize,
}

impl PanelKeys {
    fn take(raw: &mut RawConfig) -> Result<PanelKeys, ConfigError> {
        Ok(PanelKeys {
            url: raw.take_with("panel_url", |v| {
                // The value may carry credentials: the error never repeats it.
                match url::Url::parse(v) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                        Ok(v.to_owned())
                    }
                    _ => Err("is not an http:// or https:// URL with a host".to_owned()),
                }
            })?,
            secret: raw.take_with("panel_secret", |v| Secret::new(v.to_owned()))?,
            batch_max: raw
                .take_range("panel_batch_max", "a number of entries", 1, MAX_PANEL_BATCH)?
                .map_or(1, |n| n as usize),
        })
    }
}

impl MasterConfig {
    pub fn load(path: &Path) -> Result<MasterConfig, ConfigError> {
        Self::from_raw(RawConfig::load(path)?)
    }

    pub fn from_raw(mut raw: RawConfig) -> Result<MasterConfig, ConfigError> {
        let disabled = raw.take_bool("disabled")?.unwrap_or(false);
        let listen = raw
            .take_with("listen", |v| parse_tcp_endpoint(v, Some(1515)))?
            .unwrap_or_else(|| "tcp://0.0.0.0:1515".into());
        let secret = raw.take_with("secret", |v| Secret::new(v.to_owned()))?;
        let node_secrets_file = raw
            .take_str("node_secrets_file")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        // `db_path=` is `database=sqlite://PATH`'s older name (SPEC §12).
        let db_path = raw.take_str("db_path").filter(|v| !v.is_empty());
        let password_file = raw
            .take_str("database_password_file")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let database = raw.take_with("database", |v| {
            if db_path.is_some() {
                return Err("set database= or db_path= (its older name), not both".into());
            }
            crate::store::Database::parse(v, password_file.as_deref())
        })?;
        let database = match database {
            Some(d) => d,
            None if password_file.is_some() => {
                return Err(ConfigError {
                    path: raw.path().to_owned(),
                    line: None,
                    key: Some("database_password_file".into()),
                    message: "is only for a PostgreSQL database=postgres://… URL".into(),
                })
            }
            None => crate::store::Database::Sqlite(
                db_path.map_or_else(|| "/var/lib/vmwatch/master.db".into(), PathBuf::from),
            ),
        };
        let http_listen = raw
            .take_with("http_listen", |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| format!("`{v}` is not an address of the form IP:PORT"))
            })?
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1516)));
        let api_token = raw.take_with("api_token", |v| Secret::new(v.to_owned()))?;
        let panel = PanelKeys::take(&mut raw)?;
        let bus_url = raw.take_with("bus_url", BusUrl::parse)?;
        let bus_exchange = raw
            .take_with("bus_exchange", exchange_name)?
            .unwrap_or_else(|| "vmwatch".into());
        let max_nodes = raw
            .take_range("max_nodes", "a number of nodes", 1, 1_000_000)?
            .unwrap_or(10_000) as usize;
        let allow_fleet_transport = raw.take_bool("allow_fleet_transport")?;
        let max_connections_per_address = raw
            .take_range(
                "max_connections_per_address",
                "a number of connections",
                1,
                1_000_000,
            )?
            .unwrap_or(256) as usize;
        let http_hosts = raw
            .take_with("http_hosts", |v| {
                Ok::<_, String>(
                    v.split(',')
                        .map(|h| h.trim().to_owned())
                        .filter(|h| !h.is_empty())
                        .collect::<Vec<_>>(),
                )
            })?
            .unwrap_or_default();
        let node_connect = raw.take_with("node_connect", |v| {
            v.split(',')
                .map(|e| parse_tcp_endpoint(e.trim(), Some(1515)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let activity_min_window = raw
            .take_seconds("activity_min_window", 0, 86_400)?
            .unwrap_or(60);
        let min_stats_interval = raw
            .take_seconds("min_stats_interval", 0, 86_400)?
            .unwrap_or(1);
        let max_vms_per_node = raw
            .take_range("max_vms_per_node", "a number of VMs", 1, 1_000_000)?
            .unwrap_or(4096) as usize;
        let ha_on = raw.take_bool("ha")?.unwrap_or(false);
        let ha_lease = raw.take_seconds("ha_lease", 3, 300)?.unwrap_or(10);
        let ha_name = raw.take_str("ha_name").filter(|v| !v.is_empty());
        let ha = if ha_on {
            if database.sqlite_path().is_some() {
                return Err(ConfigError {
                    path: raw.path().to_owned(),
                    line: None,
                    key: Some("ha".into()),
                    message: "needs a PostgreSQL database (database=postgres://…): masters cannot share a SQLite file".into(),
                });
            }
            Some(Ha {
                name: ha_name.unwrap_or_else(|| {
                    nix::unistd::gethostname()
                        .ok()
                        .and_then(|h| h.into_string().ok())
                        .unwrap_or_else(|| "vmwatch-master".into())
                }),
                lease: std::time::Duration::from_secs(ha_lease),
            })
        } else {
            None
        };
        // Each master's sessions carry its name (pg_stat_activity tells the two apart).
        let database = match &ha {
            Some(ha) => database.named(&format!("vmwatch-master {}", ha.name)),
            None => database,
        };
        let config = MasterConfig {
            disabled,
            listen,
            secret,
            node_secrets: HashMap::new(),
            node_secrets_file,
            database,
            http_listen,
            api_token,
            panel: None,
            bus: bus_url.map(|url| Bus {
                url,
                exchange: bus_exchange,
            }),
            node_timeout: raw.take_seconds("node_timeout", 1, 86_400)?.unwrap_or(90),
            max_clock_skew: raw
                .take_seconds("max_clock_skew", 1, 86_400)?
                .unwrap_or(300),
            max_message_age: raw
                .take_seconds("max_message_age", 1, 30 * 86_400)?
                .unwrap_or(3600),
            idle_windows: raw
                .take_parsed::<u32>("idle_windows", "a whole number")?
                .unwrap_or(1),
            idle_tx_packets_max: raw
                .take_range(
                    "idle_tx_packets_max",
                    "a number of packets per window",
                    0,
                    1 << 40,
                )?
                .unwrap_or(0),
            idle_wr_reqs_max: raw
                .take_range(
                    "idle_wr_reqs_max",
                    "a number of write requests per window",
                    0,
                    1 << 40,
                )?
                .unwrap_or(0),
            duplicate_grace: raw
                .take_seconds("duplicate_grace", 0, 86_400)?
                .unwrap_or(60),
            event_retention_days: raw
                .take_range("event_retention_days", "a whole number of days", 0, 36_500)?
                .unwrap_or(90),
            activity_retention_days: raw
                .take_range("activity_retention_days", "a whole number of days", 0, 3650)?
                .unwrap_or(14),
            max_message_bytes: raw
                .take_range("max_message_bytes", "a size in bytes", 1024, 1 << 30)?
                .map_or(1_048_576, |n| n as i64),
            node_keys: raw
                .take_with("node_keys", |v| match v {
                    "derived" => Ok(NodeKeys::Derived),
                    "shared" => Ok(NodeKeys::Shared),
                    _ => Err(format!("`{v}` is neither `derived` nor `shared`")),
                })?
                .unwrap_or(NodeKeys::Derived),
            max_nodes,
            max_connections: raw
                .take_range("max_connections", "a number of connections", 16, 1_000_000)?
                .map_or(max_nodes + 1024, |n| n as usize),
            log_file: raw
                .take_str("log_file")
                .map_or_else(|| "/var/log/vmwatch-master.log".into(), PathBuf::from),
            log_level: raw
                .take_with("log_level", |v| {
                    logging::check_level(v).map(|_| v.to_owned())
                })?
                .unwrap_or_else(|| "info".into()),
            allow_fleet_transport,
            max_connections_per_address,
            http_hosts,
            node_connect: node_connect.unwrap_or_default(),
            activity_min_window,
            min_stats_interval,
            max_vms_per_node,
            ha,
        };
        let path = raw.path().to_owned();
        raw.finish()?;
        config.completed(&path, panel)
    }

    /// The checks across keys, once every key is read: the node secrets file, the panel, and
    /// what a key requires of another.
    fn completed(mut self, path: &Path, panel: PanelKeys) -> Result<MasterConfig, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            path: path.to_owned(),
            line: None,
            key: Some(key.to_owned()),
            message,
        };
        if let Some(file) = &self.node_secrets_file {
            self.node_secrets = load_node_secrets(file)?;
        }
        if self.secret.is_none() && !self.disabled {
            return Err(err(
                "secret",
                "is required (the CURVE keys and the derived node secrets come from it)".into(),
            ));
        }
        self.panel = match (panel.url, panel.secret) {
            (Some(url), Some(secret)) => Some(Panel {
                url,
                secret,
                batch_max: panel.batch_max,
            }),
            (Some(_), None) => {
                return Err(err(
                    "panel_secret",
                    "is required when panel_url is set (a node key must never sign panel notifications)"
                        .into(),
                ))
            }
            (None, _) => None,
        };
        if self.idle_windows == 0 {
            return Err(err("idle_windows", "must be at least 1".into()));
        }
        if !self.http_listen.ip().is_loopback() && self.api_token.is_none() {
            return Err(err(
                "api_token",
                format!(
                    "is required when http_listen ({}) is not a loopback address",
                    self.http_listen
                ),
            ));
        }
        Ok(self)
    }

    /// The HMAC secret of a node: its own if `node_secrets_file` lists it, else derived from
    /// `secret` (`node_keys=derived`) or `secret` itself (`node_keys=shared`).
    pub fn key_for(&self, node_id: &NodeId) -> Option<Vec<u8>> {
        if let Some(own) = self.node_secrets.get(node_id.as_str()) {
            return Some(own.expose().to_vec());
        }
        let secret = self.secret.as_ref()?.expose();
        Some(match self.node_keys {
            NodeKeys::Derived => keys::node_secret(secret, node_id).into_bytes(),
            NodeKeys::Shared => secret.to_vec(),
        })
    }

    /// The endpoints enrolled nodes are told to use: `node_connect`, else `listen` with a
    /// wildcard address replaced by this host's name.
    pub fn connect_endpoints(&self) -> Vec<String> {
        if !self.node_connect.is_empty() {
            return self.node_connect.clone();
        }
        let rest = self.listen.trim_start_matches("tcp://");
        let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "1515"));
        let host = match host {
            "0.0.0.0" | "*" | "[::]" | "::" => nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into()),
            h => h.to_owned(),
        };
        vec![format!("tcp://{host}:{port}")]
    }

    /// What `--node-secret NODE_ID` prints: the lines of that node's configuration that carry
    /// its identity and keys (not its endpoints; it does not enroll the node).
    pub fn node_config_lines(&self, node_id: &NodeId) -> Option<String> {
        let secret = self.secret.as_ref()?.expose();
        Some(keys::node_config_lines(
            secret,
            node_id,
            &self.key_for(node_id)?,
            &[],
        ))
    }

    /// The CURVE public key of the node named `node_id` (`None` without `secret`, or for a
    /// text that is no node id).
    pub fn node_public_key(&self, node_id: &str) -> Option<[u8; 32]> {
        let node = NodeId::parse(node_id).ok()?;
        Some(keys::node_curve_keypair(self.secret.as_ref()?.expose(), &node).public)
    }

    /// The effective configuration as `KEY=VALUE` lines, secrets masked.
    pub fn describe(&self) -> String {
        let opt = |o: &Option<Secret>| o.as_ref().map(|s| s.to_string()).unwrap_or_default();
        format!(
            "disabled={}\nlisten={}\nsecret={}\nnode_secrets_file={} ({} nodes)\ndatabase={}\nhttp_listen={}\napi_token={}\n\
             panel_url={}\npanel_secret={}\npanel_batch_max={}\nbus_url={}\nbus_exchange={}\nnode_timeout={}\nmax_clock_skew={}\nmax_message_age={}\nidle_windows={}\nidle_tx_packets_max={}\nidle_wr_reqs_max={}\nduplicate_grace={}\n\
             event_retention_days={}\nactivity_retention_days={}\nmax_message_bytes={}\nnode_keys={}\nmax_nodes={}\nmax_connections={}\n\
             log_file={}\nlog_level={}\nallow_fleet_transport={}\nmax_connections_per_address={}\nhttp_hosts={}\nnode_connect={}\nactivity_min_window={}\nmin_stats_interval={}\nmax_vms_per_node={}\nha={}\nha_name={}\nha_lease={}\n",
            if self.disabled { "yes" } else { "no" },
            self.listen,
            opt(&self.secret),
            self.node_secrets_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            self.node_secrets.len(),
            self.database,
            self.http_listen,
            opt(&self.api_token),
            self.panel.as_ref().map(|p| masked_url(&p.url)).unwrap_or_default(),
            self.panel
                .as_ref()
                .map(|p| p.secret.to_string())
                .unwrap_or_default(),
            self.panel.as_ref().map_or(1, |p| p.batch_max),
            self.bus.as_ref().map(|b| b.url.to_string()).unwrap_or_default(),
            self.bus.as_ref().map_or("vmwatch", |b| b.exchange.as_str()),
            self.node_timeout,
            self.max_clock_skew,
            self.max_message_age,
            self.idle_windows,
            self.idle_tx_packets_max,
            self.idle_wr_reqs_max,
            self.duplicate_grace,
            self.event_retention_days,
            self.activity_retention_days,
            self.max_message_bytes,
            self.node_keys.as_str(),
            self.max_nodes,
            self.max_connections,
            self.log_file.display(),
            self.log_level,
            match self.allow_fleet_transport {
                Some(true) => "yes",
                Some(false) => "no",
                None => "(unset: yes only for a database from before per-node keys)",
            },
            self.max_connections_per_address,
            self.http_hosts.join(","),
            self.connect_endpoints().join(","),
            self.activity_min_window,
            self.min_stats_interval,
            self.max_vms_per_node,
            if self.ha.is_some() { "yes" } else { "no" },
            self.ha.as_ref().map(|h| h.name.as_str()).unwrap_or_default(),
            self.ha.as_ref().map_or(10, |h| h.lease.as_secs()),
        )
    }
}

/// This master's part in a high-availability group (SPEC §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ha {
    /// How the others and `/healthz` name it (`ha_name`, default the host name).
    pub name: String,
    /// `ha_lease`: a leader that has not renewed for this long may be replaced.
    pub lease: std::time::Duration,
}

/// Which secret a node signs with (`node_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKeys {
    /// Node N: `keys::node_secret(secret, N)`, so no hypervisor can sign as another.
    Derived,
    /// Every node: `secret` itself (the original system's mode).
    Shared,
}

impl NodeKeys {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKeys::Derived => "derived",
            NodeKeys::Shared => "shared",
        }
    }
}

/// `node_id=secret` lines, same syntax rules as the main file. Refused when other users can
/// read it.
fn load_node_secrets(path: &Path) -> Result<HashMap<String, Secret>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o007 != 0 {
            return Err(ConfigError {
                path: path.to_owned(),
                line: None,
                key: None,
                message: format!(
                    "holds node secrets and other users can read it; run: chmod o-rwx {}",
                    path.display()
                ),
            });
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        line: None,
        key: None,
        message: format!("cannot read: {e}"),
    })?;
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let err = |key: Option<&str>, message: String| ConfigError {
            path: path.to_owned(),
            line: Some(i + 1),
            key: key.map(str::to_owned),
            message,
        };
        let Some((node, secret)) = t.split_once('=') else {
            return Err(err(None, "malformed line: expected NODE_ID=SECRET".into()));
        };
        let node = node.trim();
        NodeId::parse(node).map_err(|e| err(Some(node), e))?;
        let secret = Secret::new(secret.trim().to_owned()).map_err(|e| err(Some(node), e))?;
        if out.insert(node.to_owned(), secret).is_some() {
            return Err(err(Some(node), "duplicate node".into()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<MasterConfig, String> {
        RawConfig::parse(Path::new("master.conf"), text)
            .and_then(MasterConfig::from_raw)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = load("secret=0123456789abcdef\n").unwrap();
        assert_eq!(c.listen, "tcp://0.0.0.0:1515");
        assert_eq!(c.http_listen.to_string(), "127.0.0.1:1516");
        assert_eq!(
            (
                c.node_timeout,
                c.max_clock_skew,
                c.idle_windows,
                c.max_message_bytes
            ),
            (90, 300, 1, 1_048_576)
        );
        assert!(!c.describe().contains("0123456789abcdef"));
    }

    #[test]
    fn rules_across_keys() {
        assert_eq!(
            load("listen=tcp://0.0.0.0:1\n").unwrap_err(),
            "master.conf: key `secret`: is required (the CURVE keys and the derived node secrets come from it)"
        );
        assert_eq!(
            load("secret=0123456789abcdef\npanel_url=http://127.0.0.1:9/\n").unwrap_err(),
            "master.conf: key `panel_secret`: is required when panel_url is set (a node key must never sign panel notifications)"
        );
        assert!(load("secret=0123456789abcdef\nnode_keys=sometimes\n")
            .unwrap_err()
            .contains("neither `derived` nor `shared`"));
        assert!(load("disabled=yes\n").unwrap().disabled);
        assert_eq!(
            load("secret=0123456789abcdef\nhttp_listen=0.0.0.0:1516\n").unwrap_err(),
            "master.conf: key `api_token`: is required when http_listen (0.0.0.0:1516) is not a loopback address"
        );
        assert_eq!(
            load("secret=0123456789abcdef\nidle_windows=0\n").unwrap_err(),
            "master.conf: key `idle_windows`: must be at least 1"
        );
    }

    /// No secret of a URL shows in `--check-config` or an error (issue 24, item 3); the AMQP
    /// trailing slash means the default vhost.
    #[test]
    fn urls_are_masked_everywhere() {
        let c = load(
            "secret=0123456789abcdef\npanel_secret=0123456789abcdef\n\
             panel_url=https://hook:pw-in-url@panel.example/hook?token=tok-in-query\n",
        )
        .unwrap();
        let shown = c.describe();
        assert!(
            !shown.contains("pw-in-url") && !shown.contains("tok-in-query"),
            "{shown}"
        );
        assert!(
            shown.contains("panel_url=https://********@panel.example/hook?********\n"),
            "{shown}"
        );
        for bad in [
            "panel_url=ftp://u:pw-in-url@h/",
            "panel_url=http//u:pw-in-url@h",
            "bus_url=amqp:guest:pw-in-url@127.0.0.1:5672/",
            "bus_url=amqp://guest:pw-in-url@127.0.0.1:notaport/",
        ] {
            let e = load(&format!(
                "secret=0123456789abcdef\npanel_secret=0123456789abcdef\n{bad}\n"
            ))
            .unwrap_err();
            assert!(!e.contains("pw-in-url"), "{bad}: {e}");
        }
        let c =
            load("secret=0123456789abcdef\nbus_url=amqp://guest:guest@127.0.0.1:5672/\n").unwrap();
        assert_eq!(c.bus.as_ref().unwrap().url.uri().vhost, "/");
        assert_eq!(masked_url("not a url pw"), "(not a URL; not shown)");
    }

    /// The broker's password never shows, not even in an error; an IP host is kept as written.
    #[test]
    fn database_keys() {
        let c = load("secret=0123456789abcdef\ndb_path=/srv/m.db\n").unwrap();
        assert_eq!(c.database.to_string(), "sqlite:///srv/m.db");
        let c = load(
            "secret=0123456789abcdef\ndatabase=postgres://vm:pg-s3cret@h1,h2/vmwatch?sslmode=require\n",
        )
        .unwrap();
        assert!(c.database.sqlite_path().is_none());
        let shown = c.describe();
        assert!(
            shown.contains("database=postgres://vm:***@h1,h2/vmwatch?sslmode=require")
                && !shown.contains("pg-s3cret"),
            "{shown}"
        );
        let both = load("secret=0123456789abcdef\ndb_path=/a\ndatabase=sqlite:///b\n").unwrap_err();
        assert!(both.contains("not both"), "{both}");
        let relative = load("secret=0123456789abcdef\ndatabase=sqlite://m.db\n").unwrap_err();
        assert!(relative.contains("absolute path"), "{relative}");
        let stray = load("secret=0123456789abcdef\ndatabase_password_file=/p\n").unwrap_err();
        assert!(stray.contains("only for a PostgreSQL"), "{stray}");
        let bad = load("secret=0123456789abcdef\ndatabase=mysql://vm:pw@h/db\n").unwrap_err();
        assert!(
            bad.contains("expected sqlite") && !bad.contains(":pw@"),
            "{bad}"
        );
    }

    #[test]
    fn bus_keys() {
        let c =
            load("secret=0123456789abcdef\nbus_url=amqp://panel:s3cret-pw@127.0.0.1:5673/prod\n")
                .unwrap();
        let bus = c.bus.as_ref().unwrap();
        assert_eq!(bus.exchange, "vmwatch");
        assert_eq!(bus.url.uri().authority.host, "127.0.0.1");
        assert_eq!(bus.url.uri().authority.port, 5673);
        assert_eq!(bus.url.uri().authority.userinfo.password, "s3cret-pw");
        assert_eq!(bus.url.uri().vhost, "prod");
        assert_eq!(
            bus.url.to_string(),
            "amqp://panel:********@127.0.0.1:5673/prod"
        );
        assert!(!c.describe().contains("s3cret-pw"));
        assert!(!format!("{c:?}").contains("s3cret-pw"));
        assert!(c
            .describe()
            .contains("bus_url=amqp://panel:********@127.0.0.1:5673/prod\n"));
        let e = load("secret=0123456789abcdef\nbus_url=http://u:s3cret-pw@host/\n").unwrap_err();
        assert_eq!(
            e,
            "master.conf:2: key `bus_url`: has the scheme `http`; expected amqp:// or amqps://"
        );
        let e = load("secret=0123456789abcdef\nbus_url=amqp://u:s3cret-pw@\n").unwrap_err();
        assert!(!e.contains("s3cret-pw"), "{e}");
        assert!(
            load("secret=0123456789abcdef\nbus_url=amqp://h\nbus_exchange=amq.topic\n")
                .unwrap_err()
                .contains("reserved")
        );
        assert!(
            load("secret=0123456789abcdef\nbus_url=amqp://h\nbus_exchange=a b\n")
                .unwrap_err()
                .contains("not an exchange name")
        );
        let c = load("secret=0123456789abcdef\nbus_url=amqps://[::1]\nbus_exchange=events.v1\n")
            .unwrap();
        let bus = c.bus.as_ref().unwrap();
        assert_eq!(
            (
                bus.url.uri().authority.host.as_str(),
                bus.url.uri().authority.port
            ),
            ("::1", 5671)
        );
        assert_eq!(bus.exchange, "events.v1");
    }

    #[test]
    fn node_secrets_file() {
        let dir = std::env::temp_dir().join(format!("vmwatch-master-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("nodes");
        std::fs::write(&f, "# per node\nhv1=aaaaaaaaaaaaaaaa$x\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        // Readable by others: refused, naming the fix.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&format!(
            "secret=0123456789abcdef\nnode_secrets_file={}\n",
            f.display()
        ))
        .unwrap_err();
        assert!(e.contains("chmod o-rwx"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load(&format!(
            "secret=0123456789abcdef\nnode_secrets_file={}\n",
            f.display()
        ))
        .unwrap();
        let hv1 = NodeId::parse("hv1").unwrap();
        assert_eq!(c.key_for(&hv1), Some(b"aaaaaaaaaaaaaaaa$x".to_vec()));
        let hv2 = NodeId::parse("hv2").unwrap();
        assert_eq!(
            c.key_for(&hv2),
            Some(keys::node_secret(b"0123456789abcdef", &hv2).into_bytes())
        );
        assert!(c
            .node_config_lines(&hv1)
            .unwrap()
            .contains("\nsecret=aaaaaaaaaaaaaaaa$x\n"));
        std::fs::write(&f, "hv1=short\n").unwrap();
        let e = load(&format!(
            "secret=0123456789abcdef\nnode_secrets_file={}\n",
            f.display()
        ))
        .unwrap_err();
        assert!(
            e.ends_with(":1: key `hv1`: must be at least 16 characters long"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
