//! End-to-end test harness for vmwatch: a private `libvirtd` per test with real (tiny, TCG)
//! QEMU guests, so the node agent and the master can be tested against the real thing.
//!
//! * [`libvirtd::PrivateLibvirtd`] runs one libvirtd in its own directory, its own named
//!   network namespace and its own mount namespace; any number of them can run at once (in
//!   one process and across processes). Dropping it destroys the guests, kills every process
//!   of the instance, deletes the namespace and the directory.
//! * [`guests`] builds the disks and domain XML of three guest kinds (idle, disk writer, PXE)
//!   and defines them on a [`libvirtd::PrivateLibvirtd`].
//! * [`product`] runs the real `vmwatch-master` / `vmwatch-node` binaries for `tests/e2e.rs`.
//! * [`browser`] drives the status page in the system's headless Chromium.
//! * [`require_root_env`] is the guard every test that needs root and the system tools calls
//!   first: it skips loudly on a developer machine and fails on CI.
//!
//! See `shared/libvirt-testing.md` for the measured facts this harness is built on.

/// A private RabbitMQ broker and a consumer on it (the event bus tests).
pub mod broker;
/// The status page in a real browser (headless Chromium driven by `tests/browser/`).
pub mod browser;
pub mod guests;
pub mod libvirtd;
/// A private PostgreSQL cluster (the store's second backend).
pub mod pg;
/// The real vmwatch binaries as processes (maintained with the end-to-end tests).
pub mod product;
/// A private Prometheus server (the alert rules and dashboard tests).
pub mod prometheus;
pub mod receiver;
pub mod reference;
pub mod sim;

use std::path::Path;

/// The programs the harness runs.
const REQUIRED_PROGRAMS: [&str; 5] = ["libvirtd", "virsh", "qemu-system-x86_64", "ip", "unshare"];

/// Whether the environment can run a real-libvirtd test: we are root and `libvirtd`, `virsh`,
/// `qemu-system-x86_64`, `ip` (and `unshare`) are on `PATH`.
///
/// When it cannot: panics if the env var `CI` is set and non-empty (CI must never skip),
/// otherwise prints `SKIPPED <test>: ...` to stderr and returns `false`.
///
/// ```no_run
/// #[test]
/// fn my_test() {
///     if !vmwatch_tests::require_root_env("my_test") {
///         return;
///     }
///     // ...
/// }
/// ```
pub fn require_root_env(test: &str) -> bool {
    let mut missing: Vec<String> = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (effective uid 0)".to_string());
    }
    for prog in REQUIRED_PROGRAMS {
        if find_on_path(prog).is_none() {
            missing.push(format!("`{prog}` on PATH"));
        }
    }
    ready_or_skip(test, &missing, "run scripts/install-deps.sh as root")
}

/// The one rule for environment guards: nothing missing → `true`; something missing → panic
/// under CI (CI must never skip), else a loud `SKIPPED <test>` on stderr and `false`.
pub fn ready_or_skip(test: &str, missing: &[String], hint: &str) -> bool {
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "{test}: CI is set, so this test must not be skipped, but it needs: {what} ({hint})"
        );
    }
    eprintln!(
        "\n************************************************************\n\
         SKIPPED {test}: needs {what}\n\
         ({hint}; set CI=1 to make this a failure)\n\
         ************************************************************\n"
    );
    false
}

/// The full path of `prog` if it is an executable file in one of the `PATH` directories.
fn find_on_path(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
