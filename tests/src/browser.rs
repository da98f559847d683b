//! The status page in a real browser: the system's headless Chromium (Debian package
//! `chromium`) driven by `tests/browser/statuspage.mjs` (playwright-core from npm, pinned by
//! `tests/browser/package-lock.json`; it never downloads a browser).
//!
//! [`Driver`] runs the driver's scenario mode: one JSON command per line on its stdin, one JSON
//! event per line on its stdout (see the comment at the top of `statuspage.mjs`). [`measure`]
//! runs its measure mode for the page benchmark.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// The Chromium binary of the Debian package.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// `tests/browser/`: the driver script, its `package.json` and `package-lock.json`.
pub fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Whether Chromium (`/usr/bin/chromium`), `node` and `npm` are there.
///
/// When not: panics if the env var `CI` is set and non-empty (CI must never skip), otherwise
/// prints `SKIPPED <test>: ...` to stderr and returns `false`.
pub fn require_browser_env(test: &str) -> bool {
    let mut missing = Vec::new();
    if !crate::is_executable(Path::new(CHROMIUM)) {
        missing.push(format!("{CHROMIUM} (Debian package chromium)"));
    }
    for prog in ["node", "npm"] {
        if crate::find_on_path(prog).is_none() {
            missing.push(format!("`{prog}` on PATH"));
        }
    }
    crate::ready_or_skip(
        test,
        &missing,
        "run scripts/install-deps.sh as root; Node.js 20+ with npm",
    )
}

/// Installs the driver's npm dependencies (`npm ci`, from the committed lock file) unless
/// `node_modules/playwright-core` is already there. Serialized across threads of one process.
pub fn ensure_driver() -> Result<()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = driver_dir();
    if dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        return Ok(());
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .context("running npm ci in tests/browser")?;
    if !out.status.success() {
        bail!(
            "npm ci in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn node_command(args: &[String], stderr_log: &Path) -> Result<Command> {
    let err = std::fs::File::create(stderr_log)
        .with_context(|| format!("creating {}", stderr_log.display()))?;
    let mut cmd = Command::new("node");
    cmd.arg(driver_dir().join("statuspage.mjs"))
        .args(args)
        .current_dir(driver_dir())
        .env("VMWATCH_CHROMIUM", CHROMIUM)
        .stderr(err);
    Ok(cmd)
}

/// A running scenario driver (a `node` process with a headless Chromium under it).
pub struct Driver {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr_log: PathBuf,
    /// Every stdout line so far.
    pub transcript: Vec<String>,
}

impl Driver {
    /// Starts `node statuspage.mjs [--token T] <url> <screenshot> <uuid...>`; its stderr goes
    /// to `stderr_log`.
    pub fn start(
        url: &str,
        screenshot: &Path,
        uuids: &[&str],
        token: Option<&str>,
        stderr_log: &Path,
    ) -> Result<Driver> {
        ensure_driver()?;
        let mut args = Vec::new();
        if let Some(t) = token {
            args.push("--token".to_owned());
            args.push(t.to_owned());
        }
        args.push(url.to_owned());
        args.push(screenshot.display().to_string());
        args.extend(uuids.iter().map(|u| (*u).to_owned()));
        let mut child = node_command(&args, stderr_log)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning node statuspage.mjs")?;
        let stdin = child.stdin.take().context("driver stdin")?;
        let stdout = child.stdout.take().context("driver stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Driver {
            child: Some(child),
            stdin: Some(stdin),
            lines,
            stderr_log: stderr_log.to_owned(),
            transcript: Vec::new(),
        })
    }

    /// The driver's stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The next JSON event on stdout, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) if v.is_object() => return Ok(v),
                        _ => continue, // not one of ours (a library's stray output)
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "no event from the browser driver within {timeout:?}; stderr:\n{}",
                    self.stderr_text()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "the browser driver closed its stdout; stderr:\n{}",
                    self.stderr_text()
                ),
            }
        }
    }

    /// Sends one command and returns its answer.
    pub fn command(&mut self, cmd: &Value, timeout: Duration) -> Result<Value> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("driver stdin closed"))?;
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .context("writing to the browser driver")?;
        self.next_event(timeout)
    }

    /// Sends `finish`, returns the result event and the exit status.
    pub fn finish(mut self, timeout: Duration) -> Result<(Value, ExitStatus)> {
        let result = self.command(&serde_json::json!({"cmd": "finish"}), timeout)?;
        drop(self.stdin.take());
        let mut child = self.child.take().context("driver already finished")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((result, status));
            }
            if Instant::now() >= deadline {
                stop(&mut child);
                bail!("the browser driver did not exit within {timeout:?} of finish");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM (playwright closes Chromium on it), then SIGKILL after 5 s.
fn stop(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Driver {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }
}

/// Runs the driver's measure mode: `loads` page loads (after one warm-up load); returns its
/// `measure` event. `screenshot`: a full-page PNG of the last load.
pub fn measure(
    url: &str,
    loads: u32,
    screenshot: Option<&Path>,
    stderr_log: &Path,
    timeout: Duration,
) -> Result<Value> {
    ensure_driver()?;
    let mut args = vec![
        "--measure".to_owned(),
        url.to_owned(),
        "--loads".to_owned(),
        loads.to_string(),
    ];
    if let Some(s) = screenshot {
        args.push("--screenshot".to_owned());
        args.push(s.display().to_string());
    }
    let mut child = node_command(&args, stderr_log)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning node statuspage.mjs --measure")?;
    let stdout = child.stdout.take().context("driver stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>(),
        );
    });
    let lines = match rx.recv_timeout(timeout) {
        Ok(lines) => lines,
        Err(_) => {
            stop(&mut child);
            bail!("the page measurement did not finish within {timeout:?}");
        }
    };
    let status = child.wait()?;
    let stderr = std::fs::read_to_string(stderr_log).unwrap_or_default();
    let event = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "measure" || v["event"] == "result")
        .ok_or_else(|| anyhow!("no measurement from the driver ({status}); stderr:\n{stderr}"))?;
    if !status.success() || event["ok"] != true {
        bail!("the page measurement failed ({status}): {event}\nstderr:\n{stderr}");
    }
    Ok(event)
}
