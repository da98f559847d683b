//! The one daemon skeleton both binaries run (linkerd2-proxy's is the model):
//!
//! CLI → configuration, validated completely (a bad one exits 78 before anything is opened) →
//! log → `run`, with
//!
//! - one [`Shutdown`] token: SIGTERM or SIGINT triggers it, and every thread and task of the
//!   daemon gets a clone and stops on it;
//! - a `signals` thread of its own (SIGTERM/SIGINT → shutdown, SIGHUP → reopen the log), whose
//!   handlers are installed before `run` binds anything, so a signal is never met by the
//!   default action;
//! - a `watchdog` thread of its own that pings systemd while the daemon's [`Pulse`] beats;
//! - [`join_within`], a drain bounded by a grace period that says so in the log when the grace
//!   runs out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{is_world_readable, Cli, ConfigError, EX_CONFIG};
use crate::logging::{self, LogFile};
use crate::time::now_ms;

/// Exit status for bad command-line usage (`EX_USAGE` from sysexits.h).
pub const EX_USAGE: u8 = 64;

/// The one shutdown signal of a daemon: cheap to clone, waited on by threads (blocking, with a
/// timeout) and by tasks (async).
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    triggered: Mutex<bool>,
    wake: Condvar,
    watch: tokio::sync::watch::Sender<bool>,
    /// The part that ended on its own (a thread that returned or panicked before the shutdown).
    failed: Mutex<Option<&'static str>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            inner: Arc::new(ShutdownInner {
                triggered: Mutex::new(false),
                wake: Condvar::new(),
                watch: tokio::sync::watch::channel(false).0,
                failed: Mutex::new(None),
            }),
        }
    }

    /// Starts the shutdown; later calls do nothing more.
    pub fn trigger(&self) {
        let mut t = self
            .inner
            .triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *t = true;
        self.inner.wake.notify_all();
        self.inner.watch.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self
            .inner
            .triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks for at most `timeout`; true if the shutdown was triggered.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let guard = self
            .inner
            .triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .inner
            .wake
            .wait_timeout_while(guard, timeout, |t| !*t)
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// Resolves once the shutdown is triggered.
    pub async fn triggered(&self) {
        let mut rx = self.inner.watch.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|t| *t).await;
    }

    /// A receiver for code that selects on a `watch` (it turns `true` once).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.watch.subscribe()
    }

    /// A guard for the thread `part`: if the thread ends (returns or panics) before the
    /// shutdown, it logs, records the failure and triggers the shutdown, so a daemon never runs
    /// on without a part it needs.
    pub fn guard(&self, part: &'static str) -> ExitGuard {
        ExitGuard {
            shutdown: self.clone(),
            part,
        }
    }

    /// The part that ended on its own, if any (`run` turns it into an error exit).
    pub fn failed(&self) -> Option<&'static str> {
        *self.inner.failed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See [`Shutdown::guard`].
pub struct ExitGuard {
    shutdown: Shutdown,
    part: &'static str,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if self.shutdown.is_triggered() {
            return;
        }
        tracing::error!(part = self.part, "{} ended on its own; stopping", self.part);
        *self
            .shutdown
            .inner
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(self.part);
        self.shutdown.trigger();
    }
}

/// When the daemon's main loop last turned: the watchdog pings systemd only while it is recent.
#[derive(Clone, Default)]
pub struct Pulse(Arc<AtomicU64>);

impl Pulse {
    /// The loop turned at `unix_ms`.
    pub fn beat(&self, unix_ms: u64) {
        self.0.store(unix_ms, Ordering::Relaxed);
    }

    /// Milliseconds since the last beat, as of `unix_ms`.
    pub fn age_ms(&self, unix_ms: u64) -> u64 {
        unix_ms.saturating_sub(self.0.load(Ordering::Relaxed))
    }
}

/// The longest a pulse may be silent before the watchdog stops pinging (and systemd restarts
/// the daemon once its `WatchdogSec` passes).
pub const PULSE_STALE_MS: u64 = 10_000;

/// What `run` gets besides its configuration.
pub struct Context {
    pub shutdown: Shutdown,
    pub pulse: Pulse,
}

/// A daemon as the skeleton sees it.
pub struct Daemon<C> {
    /// The program name (`vmwatch-node`).
    pub name: &'static str,
    pub default_config: &'static str,
    /// Where a configuration error is recorded besides stderr.
    pub default_log: &'static str,
    pub load: fn(&Path) -> Result<C, ConfigError>,
    /// The `--check-config` summary.
    pub describe: fn(&C) -> String,
    /// The log file and level the configuration asks for.
    pub log: fn(&C) -> (PathBuf, String),
    /// Runs before logging starts, for one-shot commands (`--node-secret`); `Some` exits.
    pub command: fn(&Cli, &C) -> Option<ExitCode>,
}

impl<C> Daemon<C> {
    /// CLI → configuration → log → signal and watchdog threads → `run` → exit status.
    pub fn main(self, run: impl FnOnce(C, Context) -> anyhow::Result<()>) -> ExitCode {
        let name = self.name;
        let (_cli, config) = match self.configure() {
            Ok(c) => c,
            Err(code) => return code,
        };
        let log = match self.start_logging(&config) {
            Ok(log) => log,
            Err(code) => return code,
        };
        let shutdown = Shutdown::new();
        let pulse = Pulse::default();
        pulse.beat(now_ms());
        let signals = match SignalThread::spawn(shutdown.clone(), log) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                eprintln!("{name}: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // The watchdog pings through the drain too: it stops once `run` has returned.
        let finished = Shutdown::new();
        let watchdog = spawn_watchdog(finished.clone(), pulse.clone());
        let context = Context {
            shutdown: shutdown.clone(),
            pulse,
        };
        let result = run(config, context);
        shutdown.trigger();
        finished.trigger();
        signals.stop();
        if let Some(w) = watchdog {
            join_within(w, Duration::from_secs(1), "the watchdog thread");
        }
        match result {
            Ok(()) => {
                tracing::info!("{name} stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("{name}: {e:#}");
                ExitCode::FAILURE
            }
        }
    }

    /// The command line and the configuration; `Err` is the exit status of a run that ends
    /// here (usage, `--help`, `--version`, a bad configuration, `--check-config`, a command).
    fn configure(&self) -> Result<(Cli, C), ExitCode> {
        let name = self.name;
        let cli = match Cli::parse(std::env::args().skip(1), self.default_config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: {e}");
                return Err(ExitCode::from(EX_USAGE));
            }
        };
        if cli.help {
            print!("{}", Cli::usage(name, self.default_config));
            return Err(ExitCode::SUCCESS);
        }
        if cli.version {
            println!("{name} {}", crate::VERSION);
            return Err(ExitCode::SUCCESS);
        }
        let config = match (self.load)(&cli.config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: bad configuration: {e}");
                logging::append_line(
                    Path::new(self.default_log),
                    &format!("ERROR bad configuration: {e}"),
                );
                return Err(ExitCode::from(EX_CONFIG as u8));
            }
        };
        // As ssh refuses a private key others can read: the file holds the secrets every key
        // derives from.
        if is_world_readable(&cli.config) {
            let path = cli.config.display();
            let message = format!(
                "bad configuration: {path} holds secrets and other users can read it; run: chmod o-rwx {path}"
            );
            eprintln!("{name}: {message}");
            logging::append_line(Path::new(self.default_log), &format!("ERROR {message}"));
            return Err(ExitCode::from(EX_CONFIG as u8));
        }
        if cli.check_config {
            print!("{}", (self.describe)(&config));
            return Err(ExitCode::SUCCESS);
        }
        if let Some(code) = (self.command)(&cli, &config) {
            return Err(code);
        }
        Ok((cli, config))
    }

    /// Opens the configured log file (stderr when it cannot be opened) and installs the
    /// subscriber; a bad level is a configuration error.
    fn start_logging(&self, config: &C) -> Result<LogFile, ExitCode> {
        let name = self.name;
        let (log_path, level) = (self.log)(config);
        let log = match LogFile::open(&log_path) {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "{name}: cannot open log file {}: {e}; logging to stderr",
                    log_path.display()
                );
                LogFile::stderr()
            }
        };
        if let Err(e) = logging::init(log.clone(), &level) {
            eprintln!("{name}: {e}");
            return Err(ExitCode::from(EX_CONFIG as u8));
        }
        Ok(log)
    }
}

/// The `signals` thread: SIGTERM/SIGINT trigger the shutdown, SIGHUP reopens the log.
struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: JoinHandle<()>,
}

impl SignalThread {
    fn spawn(shutdown: Shutdown, log: LogFile) -> std::io::Result<SignalThread> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    match signal {
                        SIGHUP => match log.reopen() {
                            Ok(()) => tracing::info!("log file reopened (SIGHUP)"),
                            Err(e) => tracing::error!(error = %e, "cannot reopen the log file; still writing to the old one"),
                        },
                        SIGTERM => {
                            tracing::info!("SIGTERM received");
                            shutdown.trigger();
                        }
                        _ => {
                            tracing::info!("SIGINT received");
                            shutdown.trigger();
                        }
                    }
                }
            })?;
        Ok(SignalThread { handle, thread })
    }

    fn stop(self) {
        self.handle.close();
        join_within(self.thread, Duration::from_secs(1), "the signals thread");
    }
}

/// The `watchdog` thread, if systemd asked for one (`WatchdogSec`): pings at half the interval
/// while the pulse is fresh, until `finished`.
fn spawn_watchdog(finished: Shutdown, pulse: Pulse) -> Option<JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            while !finished.wait_timeout(every) {
                if pulse.age_ms(now_ms()) < PULSE_STALE_MS {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            }
        });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "cannot spawn the watchdog thread; systemd will restart us when WatchdogSec passes");
            None
        }
    }
}

/// Joins `thread` if it ends within `grace`; otherwise logs that the grace ran out for `what`
/// and leaves it (the process exit ends it).
pub fn join_within<T>(thread: JoinHandle<T>, grace: Duration, what: &str) -> Option<T> {
    let deadline = Instant::now() + grace;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "{what} did not stop within its grace period; exiting without it"
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match thread.join() {
        Ok(v) => Some(v),
        Err(_) => {
            tracing::error!("{what} panicked");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_wakes_a_waiting_thread_and_stays_triggered() {
        let s = Shutdown::new();
        assert!(!s.wait_timeout(Duration::from_millis(1)));
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_timeout(Duration::from_secs(60)))
        };
        s.trigger();
        assert!(waiter.join().unwrap());
        assert!(s.is_triggered());
        assert!(s.subscribe().borrow().to_owned());
    }

    #[test]
    fn join_within_gives_up_after_the_grace() {
        let s = Shutdown::new();
        let stuck = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_timeout(Duration::from_secs(60)))
        };
        assert_eq!(join_within(stuck, Duration::from_millis(20), "stuck"), None);
        s.trigger();
        let quick = std::thread::spawn(|| 7);
        assert_eq!(join_within(quick, Duration::from_secs(5), "quick"), Some(7));
    }

    #[test]
    fn a_thread_that_ends_on_its_own_stops_the_daemon() {
        let s = Shutdown::new();
        let guard = s.guard("the core thread");
        std::thread::spawn(move || {
            let _guard = guard;
            panic!("core died");
        })
        .join()
        .unwrap_err();
        assert!(s.is_triggered());
        assert_eq!(s.failed(), Some("the core thread"));
        // After the shutdown, ending is the normal way out.
        let s = Shutdown::new();
        s.trigger();
        drop(s.guard("ingest"));
        assert_eq!(s.failed(), None);
    }

    #[test]
    fn pulse_age() {
        let p = Pulse::default();
        p.beat(1_000);
        assert_eq!(p.age_ms(1_250), 250);
        assert_eq!(p.age_ms(900), 0);
    }
}
