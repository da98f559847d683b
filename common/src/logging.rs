//! Logging to a file that is reopened on SIGHUP (logrotate's `postrotate`).
//!
//! `tracing-appender` cannot reopen its file, so this is a small writer of our own: every event
//! is formatted by `tracing-subscriber` into one buffer and written with one `write_all` under a
//! mutex, so lines never interleave and a reopen never splits a line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing_subscriber::fmt::MakeWriter;

/// Where log lines go: a file (reopenable) or standard error (`log_file=-`).
#[derive(Clone)]
pub struct LogFile {
    inner: Arc<Mutex<Target>>,
}

enum Target {
    Stderr,
    File { path: PathBuf, file: File },
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Opens `path` for appending; `-` means standard error.
    pub fn open(path: &Path) -> io::Result<LogFile> {
        let target = if path == Path::new("-") {
            Target::Stderr
        } else {
            Target::File {
                path: path.to_owned(),
                file: open_append(path)?,
            }
        };
        Ok(LogFile {
            inner: Arc::new(Mutex::new(target)),
        })
    }

    /// Standard error only.
    pub fn stderr() -> LogFile {
        LogFile {
            inner: Arc::new(Mutex::new(Target::Stderr)),
        }
    }

    /// Reopens the file by path (after logrotate moved it). On failure the old handle is kept,
    /// so no line is lost, and the error is returned for the caller to log.
    pub fn reopen(&self) -> io::Result<()> {
        let mut target = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Target::File { path, file } = &mut *target {
            let new = open_append(path)?;
            // Lines already written went through write_all on the old handle; nothing is buffered.
            *file = new;
        }
        Ok(())
    }
}

/// One event is one line: control characters inside it (a newline or an ESC in a VM name sent
/// by a node) are written as `\xNN` (C1 controls as `\u{NN}`), so nothing a node sends can
/// forge a log line or drive a terminal. The final newline is kept.
fn escape_controls(buf: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let body = buf.strip_suffix(b"\n").unwrap_or(buf);
    let text = String::from_utf8_lossy(body);
    if !text.chars().any(|c| c.is_control() && c != '\t')
        && !matches!(text, std::borrow::Cow::Owned(_))
    {
        return std::borrow::Cow::Borrowed(buf);
    }
    let mut out = String::with_capacity(buf.len() + 16);
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    if body.len() != buf.len() {
        out.push('\n');
    }
    std::borrow::Cow::Owned(out.into_bytes())
}

/// One write of one formatted event.
pub struct LogWriter<'a> {
    log: &'a LogFile,
}

impl Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let buf = escape_controls(buf);
        let buf = buf.as_ref();
        let mut target = self.log.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *target {
            Target::Stderr => io::stderr().write_all(buf),
            Target::File { file, .. } => file.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogFile {
    type Writer = LogWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        LogWriter { log: self }
    }
}

/// Why logging could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log_level `{level}`: {source}")]
    Level {
        level: String,
        source: tracing::metadata::ParseLevelFilterError,
    },
    #[error("cannot install the logger: {0}")]
    Install(String),
}

/// Installs the global subscriber writing to `log` at `level` (`error` … `trace`).
///
/// A plain level filter, not `EnvFilter`: `log_level` is only ever a level ([`check_level`]),
/// and `EnvFilter`'s directive engine (regex-automata) was a third of the node's binary, which
/// every hypervisor keeps resident.
pub fn init(log: LogFile, level: &str) -> Result<(), LogError> {
    let filter: tracing::level_filters::LevelFilter =
        level.parse().map_err(|source| LogError::Level {
            level: level.to_owned(),
            source,
        })?;
    tracing_subscriber::fmt()
        .with_writer(log)
        .with_ansi(false)
        .with_target(false)
        .with_max_level(filter)
        .try_init()
        .map_err(|e| LogError::Install(e.to_string()))
}

/// Checks a `log_level` value without installing anything.
pub fn check_level(level: &str) -> Result<(), String> {
    match level {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(()),
        _ => Err(format!(
            "`{level}` is not one of error, warn, info, debug, trace"
        )),
    }
}

/// Appends one line to a log file, best effort (used before logging is set up, e.g. to record
/// a configuration error in the log as well as on stderr).
pub fn append_line(path: &Path, line: &str) {
    if let Ok(mut f) = open_append(path) {
        let ts = crate::time::now_ms();
        let _ = writeln!(f, "{}.{:03} {line}", ts / 1000, ts % 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        let line = "vm name=\"a\nforged WARN line\u{1b}[31m\u{9b}\" x\n";
        let out = escape_controls(line.as_bytes());
        assert_eq!(
            String::from_utf8(out.into_owned()).unwrap(),
            "vm name=\"a\\x0aforged WARN line\\x1b[31m\\u{9b}\" x\n"
        );
        assert!(matches!(
            escape_controls(b"plain\tline\n"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn reopen_after_rename_loses_no_line() {
        let dir = std::env::temp_dir().join(format!("vmwatch-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        let log = LogFile::open(&path).unwrap();
        log.make_writer().write_all(b"one\n").unwrap();
        std::fs::rename(&path, dir.join("x.log.1")).unwrap();
        log.make_writer().write_all(b"two\n").unwrap();
        log.reopen().unwrap();
        log.make_writer().write_all(b"three\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("x.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
