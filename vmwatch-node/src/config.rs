//! The node's configuration (`/etc/vmwatch/vmwatch-node.conf`), validated completely before
//! anything starts.

use std::path::{Path, PathBuf};

use vmwatch_common::config::{parse_tcp_endpoint, ConfigError, RawConfig, Secret};
use vmwatch_common::keys;
use vmwatch_common::logging;
use vmwatch_common::protocol::NodeId;

pub const DEFAULT_PATH: &str = "/etc/vmwatch/vmwatch-node.conf";

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub connect: String,
    pub secret: Secret,
    pub node_id: NodeId,
    pub libvirt_uri: String,
    pub stats_interval: u64,
    pub snapshot_interval: u64,
    pub heartbeat_interval: u64,
    pub send_queue: i32,
    pub log_file: PathBuf,
    pub log_level: String,
    /// The master's CURVE public key and this node's client keypair.
    pub curve: CurveClient,
}

/// What the node needs for the CURVE handshake (docs/PROTOCOL.md, "Keys").
#[derive(Debug, Clone)]
pub struct CurveClient {
    pub master_public: [u8; 32],
    /// The client keypair it presents: its own node key (`node_key`), or round 2's fleet
    /// transport key (`transport_key`).
    pub transport: keys::CurveKeyPair,
    /// Where the keys came from, for the log line that explains a failed handshake.
    pub source: KeySource,
}

/// Where a node's CURVE keys came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// `master_key` and `node_key` as the master's enrollment printed them.
    NodeKey,
    /// `master_key` and round 2's `transport_key` (the fleet key).
    FleetKey,
    /// Neither set: derived from `secret`, which is right only when `secret` is the master's
    /// (`node_keys=shared`).
    DerivedFromSecret,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::NodeKey => "node_key",
            KeySource::FleetKey => "transport_key",
            KeySource::DerivedFromSecret => "derived from secret",
        }
    }
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        Self::from_raw(RawConfig::load(path)?)
    }

    pub fn from_raw(mut raw: RawConfig) -> Result<NodeConfig, ConfigError> {
        // One master, or every master of a high-availability group (SPEC §13), comma-separated.
        let connect = raw.take_with("connect", |v| {
            let endpoints = v
                .split(',')
                .map(|e| parse_tcp_endpoint(e.trim(), Some(1515)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, String>(endpoints.join(","))
        })?;
        let secret = raw.take_with("secret", |v| Secret::new(v.to_owned()))?;
        let node_id = raw.take_with("node_id", NodeId::parse)?;
        let libvirt_uri = raw
            .take_str("libvirt_uri")
            .unwrap_or_else(|| "qemu:///system".into());
        let stats_interval = raw
            .take_seconds("stats_interval", 1, 86_400)?
            .unwrap_or(600);
        let snapshot_interval = raw
            .take_seconds("snapshot_interval", 1, 86_400)?
            .unwrap_or(60);
        let heartbeat_interval = raw
            .take_seconds("heartbeat_interval", 1, 3_600)?
            .unwrap_or(30);
        let send_queue = raw
            .take_with("send_queue", |v| match v.parse::<i32>() {
                Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
                _ => Err(format!("`{v}` is not a queue length in 1..=10000000")),
            })?
            .unwrap_or(100_000);
        let master_key = raw.take_with("master_key", keys::z85_decode)?;
        let node_key = raw.take_with("node_key", keys::CurveKeyPair::from_z85_secret)?;
        let transport_key = raw.take_with("transport_key", keys::CurveKeyPair::from_z85_secret)?;
        let log_file = raw
            .take_str("log_file")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/log/vmwatch-node.log".into());
        let log_level = raw
            .take_with("log_level", |v| {
                logging::check_level(v).map(|_| v.to_owned())
            })?
            .unwrap_or_else(|| "info".into());
        let missing = |key: &str| ConfigError {
            path: raw.path().to_owned(),
            line: None,
            key: Some(key.to_owned()),
            message: "is required but not set".into(),
        };
        let connect = connect.ok_or_else(|| missing("connect"))?;
        let secret = secret.ok_or_else(|| missing("secret"))?;
        let node_id = node_id.ok_or_else(|| missing("node_id"))?;
        let client = match (node_key, transport_key) {
            (Some(_), Some(_)) => {
                return Err(ConfigError {
                    path: raw.path().to_owned(),
                    line: None,
                    key: Some("transport_key".into()),
                    message: "cannot be set with node_key (node_key is this node's own key; transport_key the old fleet key)".into(),
                })
            }
            (Some(k), None) => Some((k, KeySource::NodeKey)),
            (None, Some(k)) => Some((k, KeySource::FleetKey)),
            (None, None) => None,
        };
        let curve = match (master_key, client) {
            (Some(master_public), Some((transport, source))) => CurveClient {
                master_public,
                transport,
                source,
            },
            // node_keys=shared: this node holds the master secret and derives both itself.
            (None, None) => CurveClient {
                master_public: keys::server_keypair(secret.expose()).public,
                transport: keys::node_curve_keypair(secret.expose(), &node_id),
                source: KeySource::DerivedFromSecret,
            },
            (Some(_), None) => return Err(missing("node_key")),
            (None, Some(_)) => return Err(missing("master_key")),
        };
        raw.finish()?;
        Ok(NodeConfig {
            connect,
            secret,
            node_id,
            libvirt_uri,
            stats_interval,
            snapshot_interval,
            heartbeat_interval,
            send_queue,
            log_file,
            log_level,
            curve,
        })
    }

    /// The effective configuration as `KEY=VALUE` lines, secrets masked.
    pub fn describe(&self) -> String {
        format!(
            "connect={}\nsecret={}\nnode_id={}\nlibvirt_uri={}\nstats_interval={}\nsnapshot_interval={}\n\
             heartbeat_interval={}\nsend_queue={}\nlog_file={}\nlog_level={}\nmaster_key={}\n{}=********\n",
            self.connect,
            self.secret,
            self.node_id,
            self.libvirt_uri,
            self.stats_interval,
            self.snapshot_interval,
            self.heartbeat_interval,
            self.send_queue,
            self.log_file.display(),
            self.log_level,
            keys::z85_encode(&self.curve.master_public),
            match self.curve.source {
                KeySource::FleetKey => "transport_key",
                _ => "node_key",
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<NodeConfig, String> {
        RawConfig::parse(Path::new("node.conf"), text)
            .and_then(NodeConfig::from_raw)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load("connect=tcp://10.0.0.1\nsecret=0123456789abcdef\nnode_id=hv1\n").unwrap();
        assert_eq!(c.connect, "tcp://10.0.0.1:1515");
        let c = load(
            "connect=tcp://10.0.0.1, tcp://10.0.0.2:1600\nsecret=0123456789abcdef\nnode_id=hv1\n",
        )
        .unwrap();
        assert_eq!(c.connect, "tcp://10.0.0.1:1515,tcp://10.0.0.2:1600");
        assert_eq!(
            (
                c.stats_interval,
                c.snapshot_interval,
                c.heartbeat_interval,
                c.send_queue
            ),
            (600, 60, 30, 100_000)
        );
        assert_eq!(c.libvirt_uri, "qemu:///system");
        assert!(c.describe().contains("secret=********\n"));
        assert!(!c.describe().contains("0123456789abcdef"));
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            load("secret=0123456789abcdef\nnode_id=hv1\n").unwrap_err(),
            "node.conf: key `connect`: is required but not set"
        );
        assert_eq!(
            load("connect=tcp://1.2.3.4:1\nsecret=short\nnode_id=hv1\n").unwrap_err(),
            "node.conf:2: key `secret`: must be at least 16 characters long"
        );
        assert!(
            load("connect=tcp://1.2.3.4:1\nsecret=0123456789abcdef\nnode_id=hv 1\n")
                .unwrap_err()
                .starts_with("node.conf:3: key `node_id`")
        );
        assert_eq!(
            load("connect=tcp://1.2.3.4:1\nsecret=0123456789abcdef\nnode_id=hv1\nstats_intervall=5\n").unwrap_err(),
            "node.conf:4: key `stats_intervall`: unknown key"
        );
    }
}
