//! The strict `KEY=VALUE` configuration format shared by both daemons.
//!
//! One `KEY=VALUE` per line; a line whose first non-blank character is `#` is a comment; blank
//! lines are ignored. The value is everything after the first `=`, trimmed: no quoting and no
//! variable expansion, so a secret containing `$`, `#` or `=` is kept literally. Unknown keys,
//! duplicate keys and malformed lines are errors that name the file, the line and the key.
//!
//! Hand-written on purpose (≈ 60 lines): `dotenvy`-style parsers expand `$VARS` inside values,
//! which silently corrupts secrets.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Exit status for a bad configuration (`EX_CONFIG` from sysexits.h).
pub const EX_CONFIG: i32 = 78;

/// A configuration error, naming the file and, where known, the line and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A parsed file: every key with its line and raw value, not yet interpreted.
///
/// Typed getters consume keys; [`RawConfig::finish`] then rejects whatever was not consumed,
/// so an unknown (for example misspelt) key can never be silently ignored.
#[derive(Debug)]
pub struct RawConfig {
    path: PathBuf,
    entries: BTreeMap<String, (usize, String)>,
}

impl RawConfig {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        RawConfig::parse(path, &text)
    }

    /// Parses `text` as the contents of `path` (the path is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
        let mut entries = BTreeMap::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line = index + 1;
            let err = |key: Option<&str>, message: String| ConfigError {
                path: path.to_owned(),
                line: Some(line),
                key: key.map(str::to_owned),
                message,
            };
            let trimmed = raw_line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((key, value)) = trimmed.split_once('=') else {
                return Err(err(None, "malformed line: expected KEY=VALUE".into()));
            };
            let key = key.trim();
            if key.is_empty()
                || !key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(err(
                    Some(key),
                    "malformed key: expected lower-case letters, digits and `_`".into(),
                ));
            }
            if let Some((first, _)) = entries.get(key) {
                return Err(err(
                    Some(key),
                    format!("duplicate key (first set on line {first})"),
                ));
            }
            entries.insert(key.to_owned(), (line, value.trim().to_owned()));
        }
        Ok(RawConfig {
            path: path.to_owned(),
            entries,
        })
    }

    /// The path this configuration came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, key: &str, line: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line,
            key: Some(key.to_owned()),
            message,
        }
    }

    /// Takes a key's raw value, if set.
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        self.entries.remove(key).map(|(_, v)| v)
    }

    /// Takes a required key.
    pub fn required_str(&mut self, key: &str) -> Result<String, ConfigError> {
        match self.entries.remove(key) {
            Some((line, v)) if v.is_empty() => {
                Err(self.error(key, Some(line), "is required and must not be empty".into()))
            }
            Some((_, v)) => Ok(v),
            None => Err(self.error(key, None, "is required but not set".into())),
        }
    }

    /// Takes a key and interprets it with `parse`, which returns a message on failure.
    pub fn take_with<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.entries.remove(key) {
            None => Ok(None),
            Some((line, value)) => parse(&value)
                .map(Some)
                .map_err(|message| self.error(key, Some(line), message)),
        }
    }

    /// Takes a key as any `FromStr` type.
    pub fn take_parsed<T: FromStr>(
        &mut self,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, ConfigError> {
        self.take_with(key, |v| {
            v.parse::<T>().map_err(|_| format!("`{v}` is not {what}"))
        })
    }

    /// Takes a `yes`/`no` key.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.take_with(key, parse_bool)
    }

    /// Takes a whole number of seconds within `min..=max`.
    pub fn take_seconds(
        &mut self,
        key: &str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        self.take_range(key, "a whole number of seconds", min, max)
    }

    /// Takes a whole number (`what` names it in the message) within `min..=max`.
    pub fn take_range(
        &mut self,
        key: &str,
        what: &str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ConfigError> {
        self.take_with(key, |v| {
            let n: u64 = v.parse().map_err(|_| format!("`{v}` is not {what}"))?;
            if n < min || n > max {
                return Err(format!("{n} is out of range {min}..={max}"));
            }
            Ok(n)
        })
    }

    /// Rejects every key that no getter consumed.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.entries.into_iter().min_by_key(|(_, (line, _))| *line) {
            None => Ok(()),
            Some((key, (line, _))) => Err(ConfigError {
                path: self.path,
                line: Some(line),
                key: Some(key),
                message: "unknown key".into(),
            }),
        }
    }
}

/// `yes`/`no` (also `true`/`false`, `1`/`0`, `on`/`off`).
pub fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "yes" | "true" | "1" | "on" => Ok(true),
        "no" | "false" | "0" | "off" => Ok(false),
        _ => Err(format!("`{v}` is not yes or no")),
    }
}

/// A ZeroMQ TCP endpoint `tcp://IP:PORT`; `default_port` applies when `:PORT` is missing.
pub fn parse_tcp_endpoint(v: &str, default_port: Option<u16>) -> Result<String, String> {
    let rest = v
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("`{v}` is not an endpoint of the form tcp://IP:PORT"))?;
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok(format!("tcp://{addr}"));
    }
    if let (Some(port), Ok(ip)) = (
        default_port,
        rest.trim_matches(['[', ']']).parse::<std::net::IpAddr>(),
    ) {
        return Ok(format!("tcp://{}", SocketAddr::new(ip, port)));
    }
    Err(format!(
        "`{v}` is not an endpoint of the form tcp://IP:PORT"
    ))
}

/// A secret: never printed. `Debug` and `Display` show a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Minimum length accepted for a shared secret.
    pub const MIN_LEN: usize = 16;

    /// Validates the length (in bytes).
    pub fn new(value: String) -> Result<Secret, String> {
        if value.len() < Self::MIN_LEN {
            return Err(format!(
                "must be at least {} characters long",
                Self::MIN_LEN
            ));
        }
        Ok(Secret(value))
    }

    /// The raw bytes, for HMAC keys only.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// True if the file is readable by "other" (mode & 0o004); the daemons warn about it.
pub fn is_world_readable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o004 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawConfig, ConfigError> {
        RawConfig::parse(Path::new("/etc/vmwatch/test.conf"), text)
    }

    fn check_err(text: &str, expected: &str) {
        let err = parse(text).expect_err("must be rejected");
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn values_are_literal() {
        let mut c =
            parse("# comment\n\n  secret = a$HOME#b=c d  \nlisten=tcp://1.2.3.4:5\n").unwrap();
        assert_eq!(c.take_str("secret").as_deref(), Some("a$HOME#b=c d"));
        assert_eq!(c.take_str("listen").as_deref(), Some("tcp://1.2.3.4:5"));
        c.finish().unwrap();
    }

    #[test]
    fn empty_value_is_empty_string() {
        let mut c = parse("panel_url=\n").unwrap();
        assert_eq!(c.take_str("panel_url").as_deref(), Some(""));
    }

    #[test]
    fn malformed_line() {
        check_err(
            "a=1\njust words\n",
            "/etc/vmwatch/test.conf:2: malformed line: expected KEY=VALUE",
        );
    }

    #[test]
    fn malformed_key() {
        check_err(
            "Bad Key=1\n",
            "/etc/vmwatch/test.conf:1: key `Bad Key`: malformed key: expected lower-case letters, digits and `_`",
        );
        check_err("=1\n", "/etc/vmwatch/test.conf:1: key ``: malformed key: expected lower-case letters, digits and `_`");
    }

    #[test]
    fn duplicate_key() {
        check_err(
            "secret=aaaaaaaaaaaaaaaa\n# x\nsecret=b\n",
            "/etc/vmwatch/test.conf:3: key `secret`: duplicate key (first set on line 1)",
        );
    }

    #[test]
    fn unknown_key_names_line() {
        let mut c = parse("listen=tcp://1.2.3.4:5\nlisen=x\nzzz=1\n").unwrap();
        c.take_str("listen");
        let err = c.finish().unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/vmwatch/test.conf:2: key `lisen`: unknown key"
        );
    }

    #[test]
    fn required_missing_and_empty() {
        let mut c = parse("node_id=\n").unwrap();
        assert_eq!(
            c.required_str("secret").unwrap_err().to_string(),
            "/etc/vmwatch/test.conf: key `secret`: is required but not set"
        );
        assert_eq!(
            c.required_str("node_id").unwrap_err().to_string(),
            "/etc/vmwatch/test.conf:1: key `node_id`: is required and must not be empty"
        );
    }

    #[test]
    fn typed_values() {
        let mut c = parse("a=yes\nb=maybe\nc=30\nd=-1\ne=999999\n").unwrap();
        assert_eq!(c.take_bool("a").unwrap(), Some(true));
        assert_eq!(
            c.take_bool("b").unwrap_err().to_string(),
            "/etc/vmwatch/test.conf:2: key `b`: `maybe` is not yes or no"
        );
        assert_eq!(c.take_seconds("c", 1, 100).unwrap(), Some(30));
        assert!(c.take_seconds("d", 1, 100).is_err());
        assert_eq!(
            c.take_seconds("e", 1, 100).unwrap_err().to_string(),
            "/etc/vmwatch/test.conf:5: key `e`: 999999 is out of range 1..=100"
        );
        assert_eq!(c.take_seconds("missing", 1, 100).unwrap(), None);
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_tcp_endpoint("tcp://127.0.0.1:1515", None).unwrap(),
            "tcp://127.0.0.1:1515"
        );
        assert_eq!(
            parse_tcp_endpoint("tcp://10.0.0.1", Some(1515)).unwrap(),
            "tcp://10.0.0.1:1515"
        );
        assert_eq!(
            parse_tcp_endpoint("tcp://[::1]:9", None).unwrap(),
            "tcp://[::1]:9"
        );
        assert!(parse_tcp_endpoint("tcp://10.0.0.1", None).is_err());
        assert!(parse_tcp_endpoint("udp://10.0.0.1:1", None).is_err());
        assert!(parse_tcp_endpoint("tcp://host.example:1", None).is_err());
    }

    #[test]
    fn secret_is_masked_and_checked() {
        assert!(Secret::new("short".into()).is_err());
        let s = Secret::new("0123456789abcdef$#=".into()).unwrap();
        assert_eq!(format!("{s} {s:?}"), "******** ********");
        assert_eq!(s.expose(), b"0123456789abcdef$#=");
    }
}

/// The command line both daemons accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    pub config: PathBuf,
    pub check_config: bool,
    pub version: bool,
    pub help: bool,
    /// `--node-secret NODE_ID` (master only): print that node's key lines and exit.
    pub node_secret: Option<String>,
    /// A subcommand and its arguments (master only: `enroll N`, `revoke N`).
    pub command: Vec<String>,
}

impl Cli {
    /// Parses `--config PATH`, `--check-config`, `--version`, `--help` (arguments after the
    /// program name).
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        default_config: &str,
    ) -> Result<Cli, String> {
        let mut cli = Cli {
            config: PathBuf::from(default_config),
            check_config: false,
            version: false,
            help: false,
            node_secret: None,
            command: Vec::new(),
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--config" | "-c" => {
                    cli.config = args
                        .next()
                        .map(PathBuf::from)
                        .ok_or("--config needs a path")?;
                }
                "--check-config" => cli.check_config = true,
                "--node-secret" => {
                    cli.node_secret = Some(args.next().ok_or("--node-secret needs a node id")?);
                }
                // `migrate --to URL [--password-file PATH]` (master only).
                "--to" | "--password-file" => {
                    let value = args.next().ok_or(format!("{arg} needs a value"))?;
                    cli.command.push(arg);
                    cli.command.push(value);
                }
                "--version" | "-V" => cli.version = true,
                "--help" | "-h" => cli.help = true,
                other => match other.strip_prefix("--config=") {
                    Some(path) => cli.config = PathBuf::from(path),
                    None if !other.starts_with('-') => cli.command.push(other.to_owned()),
                    None => return Err(format!("unknown argument `{other}` (try --help)")),
                },
            }
        }
        Ok(cli)
    }

    /// The usage text.
    pub fn usage(program: &str, default_config: &str) -> String {
        format!(
            "usage: {program} [--config PATH] [--check-config] [--version]\n\n  \
             --config PATH    configuration file (default {default_config})\n  \
             --check-config   validate the configuration, print it with secrets masked, exit\n  \
             --version        print the version and exit\n  \
             --node-secret N  (vmwatch-master) print node N's configuration key lines, exit\n  \
             enroll N         (vmwatch-master) enroll node N, print its configuration lines\n  \
             revoke N         (vmwatch-master) revoke node N: its key is refused, its rows go\n  \
             migrate --to URL [--password-file PATH]\n                   \
             (vmwatch-master) copy the SQLite database into an empty PostgreSQL one\n"
        )
    }
}

#[cfg(test)]
mod cli_tests {
    use super::*;

    #[test]
    fn cli() {
        let p = |a: &[&str]| Cli::parse(a.iter().map(|s| s.to_string()), "/etc/x.conf");
        assert_eq!(p(&[]).unwrap().config, PathBuf::from("/etc/x.conf"));
        let c = p(&["--config", "/tmp/a", "--check-config"]).unwrap();
        assert_eq!((c.config, c.check_config), (PathBuf::from("/tmp/a"), true));
        assert_eq!(p(&["--config=/b"]).unwrap().config, PathBuf::from("/b"));
        assert!(p(&["--config"]).is_err());
        assert!(p(&["--bogus"]).unwrap_err().contains("--bogus"));
    }
}
