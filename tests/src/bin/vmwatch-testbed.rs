//! `vmwatch-testbed`: a private libvirtd with three running tiny guests, for the product demo.
//!
//! ```text
//! vmwatch-testbed [--name NAME] [--dir BASE]
//! ```
//!
//! Starts a [`PrivateLibvirtd`] (its directory under `BASE`, default the system temporary
//! directory), defines and starts `NAME-idle` (idle), `NAME-writer` (disk writer) and
//! `NAME-pxe` (network boot); `NAME` defaults to `demo`. Then prints, on stdout, one
//! `KEY=VALUE` line each (safe for `eval` as long as BASE has no spaces), and flushes:
//!
//! ```text
//! LIBVIRT_URI=qemu+unix:///system?socket=/tmp/vmwatch-lv-demo-123-0/sock/libvirt-sock
//! LIBVIRT_DIR=/tmp/vmwatch-lv-demo-123-0
//! LIBVIRT_NETNS=vmwt123-0
//! DEMO_IDLE_UUID=…
//! DEMO_WRITER_UUID=…
//! DEMO_PXE_UUID=…
//! READY=1
//! ```
//!
//! (`<NAME>_<KIND>_UUID` with NAME upper-cased and every non-alphanumeric character turned into
//! `_`.) Then it waits for SIGTERM, SIGINT or SIGHUP — stdin is not read, so it runs fine in
//! the background with stdin closed — and cleans everything up (guests destroyed, libvirtd
//! killed, netns and directory removed) before exiting 0. The signals are blocked from the
//! start and taken with `sigwait`, so one arriving during setup is acted upon right after it.
//! libvirtd runs in its own process group, so a Ctrl-C reaches only this program. If this
//! program is SIGKILLed, the next start of any `PrivateLibvirtd` on the machine reaps the
//! leftovers.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::PathBuf;
use vmwatch_tests::guests::GuestKind;
use vmwatch_tests::libvirtd::PrivateLibvirtd;

const USAGE: &str = "usage: vmwatch-testbed [--name NAME] [--dir BASE]";

struct Args {
    name: String,
    dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut name = "demo".to_string();
    let mut dir = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--name" => name = it.next().context("--name needs a value")?,
            "--dir" => dir = Some(PathBuf::from(it.next().context("--dir needs a value")?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if name.is_empty() {
        bail!("--name must not be empty");
    }
    Ok(Args { name, dir })
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and every thread spawned later) and
/// returns the set for `sigwait`. Child processes get an empty mask from std.
fn block_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> Result<i32> {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised; `sig` is a valid out pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        bail!("sigwait: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(sig)
}

fn env_key(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn run() -> Result<()> {
    let args = parse_args()?;
    let set = block_signals()?;
    if !vmwatch_tests::require_root_env("vmwatch-testbed") {
        bail!("vmwatch-testbed needs root and libvirtd, virsh, qemu-system-x86_64, ip on PATH");
    }
    let lv = match &args.dir {
        Some(base) => PrivateLibvirtd::start_in(base, &args.name)?,
        None => PrivateLibvirtd::start(&args.name)?,
    };
    let mut lines = vec![
        format!("LIBVIRT_URI={}", lv.uri()),
        format!("LIBVIRT_DIR={}", lv.dir().display()),
        format!("LIBVIRT_NETNS={}", lv.netns()),
    ];
    for (suffix, kind) in [
        ("idle", GuestKind::Idle),
        ("writer", GuestKind::DiskWriter),
        ("pxe", GuestKind::Pxe),
    ] {
        let guest = format!("{}-{suffix}", args.name);
        let uuid = lv.start_guest(&guest, kind)?;
        lines.push(format!("{}_UUID={uuid}", env_key(&guest)));
    }
    lines.push("READY=1".to_string());
    {
        let mut out = std::io::stdout().lock();
        for l in &lines {
            writeln!(out, "{l}").context("writing to stdout")?;
        }
        out.flush().context("flushing stdout")?;
    }
    let sig = wait_for_signal(&set)?;
    eprintln!("vmwatch-testbed: got signal {sig}, cleaning up");
    drop(lv);
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vmwatch-testbed: {e:#}");
        std::process::exit(1);
    }
}
