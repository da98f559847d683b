//! [`PrivateLibvirtd`]: one private `libvirtd` with its own directory, named network
//! namespace and mount namespace, so that any number of them can run at once (several tests
//! in one process, several test processes) without touching the host's libvirt.
//!
//! Layout of an instance directory (`<base>/vmwatch-lv-<name>-<pid>-<counter>/`):
//!
//! | path | mounted over (inside the daemon's mount namespace) |
//! |------|------|
//! | `etc/` (`libvirtd.conf`, `qemu.conf`) | `/etc/libvirt` |
//! | `run/`, a tmpfs | `/run/libvirt` (`run/qemu/<guest>.pid`, status XML) |
//! | `lib/` | `/var/lib/libvirt` |
//! | `cache/` | `/var/cache/libvirt` (`cache/qemu/capabilities/*.xml`) |
//! | `log/` | `/var/log/libvirt` (`log/qemu/<guest>.log`) |
//! | `sock/` | the daemon's sockets (`sock/libvirt-sock`) |
//! | `images/` | guest disks |
//! | `libvirtd.log` | libvirtd's own log (level 3) |
//! | `libvirtd.stdout.log` | libvirtd's stdout and stderr |
//!
//! `run/` is a tmpfs mounted in the host's namespace (so that it outlives a libvirtd restart,
//! whose status XML tells the new daemon which guests run), as `/run` is on every systemd host.
//! On a disk, libvirtd's two `fsync`s of a guest's status XML after each state change hold the
//! domain's lock ≈ 0.5–1 ms each here, and a `virDomainGetState` right after a lifecycle event
//! (what the node does) waits for them: 1.05 ms median against 0.36 ms on a tmpfs, measured by
//! `vmwatch-bench-latency`. A real hypervisor never pays that, so neither does the testbed.
//! Cleanup unmounts it (lazily, `MNT_DETACH`) before removing the directory; so does the reaper.
//!
//! The network namespace is named `vmwt<pid>-<counter>` (`ip netns list`). libvirtd runs as
//! `ip netns exec NS unshare -m --propagation private sh -c '<bind mounts>; exec libvirtd …'`,
//! in its own process group (a Ctrl-C on the terminal does not reach it: the owner cleans up).
//! `ip`, `unshare` and `sh` all exec, so the spawned child *is* libvirtd.
//!
//! **QEMU capability cache.** libvirt probes every `qemu-system-*` binary the first time it
//! needs capabilities (define, `virsh capabilities`; not `virsh list`): ≈ 8 s for x86_64 and
//! i386 together on this project's machines. The result is a self-validating cache (it records
//! the ctime of the qemu binary and of libvirtd, libvirt's version, the kernel version, the
//! microcode version and the host CPU signature, and libvirt re-probes if any of them differs),
//! so copying a warmed cache into a fresh instance is safe: at worst libvirt ignores it and
//! probes. [`PrivateLibvirtd::start`] copies the files of a machine-wide cache directory
//! (`<tmp>/vmwatch-lv-capcache/`, or `$VMWATCH_LIBVIRT_CAPS_CACHE`) into the new instance,
//! runs `virsh capabilities` so that the probe (if any) happens inside `start()`, and writes
//! back any file that differs (write to a temporary file + atomic rename, so concurrent
//! starts never read a partial file). Each instance has its *own copy*; no directory is
//! shared between running daemons. `VMWATCH_LIBVIRT_CAPS_CACHE=off` disables this.
//!
//! **Leftovers of a crashed owner.** Drop cleans up; when the owning process dies without
//! running Drop (SIGKILL, Ctrl-C on `cargo test`), the next `start()` on the machine finds
//! namespaces `vmwt<pid>-*` whose `<pid>` is gone (or a zombie, or is this process but the
//! instance is not one of ours: pid reuse), kills every process in them, deletes them and
//! removes the matching `vmwatch-lv-*-<pid>-*` directories under the default base and the base
//! of the new instance.
//!
//! Each instance's `libvirtd.conf` sets a random `host_uuid`, so two instances look like two
//! hosts (`virsh sysinfo`/`capabilities`). Keep base directories free of spaces and `?&#%`:
//! the socket path goes into the URI unescaped.
//!
//! Set `VMWATCH_KEEP_TEST_DIRS=1` to keep the directories (logs, XML, disks) after Drop.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of the network namespaces this harness creates: `vmwt<pid>-<counter>`.
pub const NETNS_PREFIX: &str = "vmwt";
/// Prefix of the instance directories: `vmwatch-lv-<name>-<pid>-<counter>`.
pub const DIR_PREFIX: &str = "vmwatch-lv-";
/// How long `start()` / `restart()` wait for the daemon to answer (includes a cold QEMU
/// capability probe).
pub const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout of one `virsh` call.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(120);

/// Host directories hidden by the instance's own directories inside its mount namespace.
const MOUNTS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
];

/// Run by `sh -c` inside the new mount namespace; `$1` is the instance directory.
const LAUNCH_SCRIPT: &str = r#"set -e
d="$1"
mount --bind "$d/etc" /etc/libvirt
mount --bind "$d/run" /run/libvirt
mount --bind "$d/lib" /var/lib/libvirt
mount --bind "$d/cache" /var/cache/libvirt
mount --bind "$d/log" /var/log/libvirt
exec libvirtd --config "$d/etc/libvirtd.conf" --pid-file "$d/run/libvirtd.pid"
"#;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Network namespace names of the instances of this process (alive or being started).
static OWNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn owned_instances() -> MutexGuard<'static, BTreeSet<String>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the instance `vmwt<owner>-<counter>` may still be in use: its owner is alive and,
/// if the owner is this process, the instance is one of ours (not a leftover of an earlier
/// process that had the same pid).
fn instance_in_use(owner: u32, netns: &str) -> bool {
    if owner == std::process::id() {
        owned_instances().contains(netns)
    } else {
        process_alive(owner)
    }
}

/// One domain as [`PrivateLibvirtd::list_all`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DomainInfo {
    pub uuid: String,
    pub name: String,
    /// One of `running`, `blocked`, `paused`, `shutdown`, `shutoff`, `crashed`,
    /// `pmsuspended`, `nostate`.
    pub state: String,
}

/// A private libvirtd; see the module documentation. `Send + Sync`: share it by reference
/// between threads for `virsh`/`list_all`; `kill`/`restart` need `&mut`.
pub struct PrivateLibvirtd {
    name: String,
    dir: PathBuf,
    netns: String,
    /// (st_dev, st_ino) of the namespace, to find its processes even if the name is gone.
    netns_id: Option<(u64, u64)>,
    child: Mutex<Option<Child>>,
    /// When `start()` began (for the log lines).
    started: Instant,
}

impl PrivateLibvirtd {
    /// Starts a private libvirtd under the system temporary directory (`/tmp`). `name` is only
    /// used to make the directory recognisable. Waits until the daemon answers `virsh list`
    /// and has its QEMU capabilities (see the module doc about the cache).
    pub fn start(name: &str) -> Result<Self> {
        Self::start_in(&std::env::temp_dir(), name)
    }

    /// Like [`start`](Self::start) but with the instance directory created under `base`.
    pub fn start_in(base: &Path, name: &str) -> Result<Self> {
        let t0 = Instant::now();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let label: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(24)
            .collect();
        fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        let base = base
            .canonicalize()
            .with_context(|| format!("canonicalizing {}", base.display()))?;
        let dir = base.join(format!("{DIR_PREFIX}{label}-{pid}-{n}"));
        let netns = format!("{NETNS_PREFIX}{pid}-{n}");
        // Registered before anything exists, so that the stale reaper of another thread never
        // takes this instance for a leftover of an earlier process with the same pid.
        owned_instances().insert(netns.clone());

        {
            let _lock = MachineLock::acquire()?;
            reap_stale_instances(&base);
        }
        if dir.exists() {
            remove_instance_dir(&dir)
                .with_context(|| format!("removing stale {}", dir.display()))?;
        }
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;

        // From here on, Drop cleans up whatever exists.
        let mut lv = PrivateLibvirtd {
            name: name.to_string(),
            dir,
            netns,
            netns_id: None,
            child: Mutex::new(None),
            started: t0,
        };
        lv.prepare_dir()?;
        lv.create_netns()?;
        for (_, mountpoint) in MOUNTS {
            fs::create_dir_all(mountpoint)
                .with_context(|| format!("creating host mountpoint {mountpoint}"))?;
        }
        let caches = CapsCache::from_env();
        if let Some(c) = &caches {
            c.copy_in(&lv.caps_dir());
        }
        lv.spawn_and_wait()?;
        // Trigger the QEMU capability probe now (a no-op with a valid cache), so that the
        // first define does not take seconds and the cache can be saved.
        lv.virsh(&["capabilities"])
            .context("virsh capabilities (QEMU capability probe)")?;
        if let Some(c) = &caches {
            c.copy_out(&lv.caps_dir());
        }
        eprintln!(
            "PrivateLibvirtd {:?}: started in {:.2?} (dir {}, netns {})",
            lv.name,
            t0.elapsed(),
            lv.dir.display(),
            lv.netns
        );
        Ok(lv)
    }

    /// `qemu+unix:///system?socket=<dir>/sock/libvirt-sock`
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.socket_path().display()
        )
    }

    /// The instance directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The name of the network namespace libvirtd and the guests run in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The read-write socket (`<dir>/sock/libvirt-sock`).
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("sock").join("libvirt-sock")
    }

    /// libvirtd's own log file (`log_outputs`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("libvirtd.log")
    }

    /// The directory guest disks go to.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    /// The pid of libvirtd if it is running.
    pub fn pid(&self) -> Option<u32> {
        let mut guard = self.child_lock();
        match guard.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(None) => Some(child.id()),
                _ => None,
            },
            None => None,
        }
    }

    /// Whether the libvirtd process is alive (it may not answer yet).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Runs `virsh -c <uri> <args>` (with `LC_ALL=C`) and returns its stdout. The error names
    /// the arguments and carries virsh's stderr.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        self.virsh_with_timeout(args, VIRSH_TIMEOUT)
    }

    /// [`virsh`](Self::virsh) with an explicit timeout (the process is killed after it).
    pub fn virsh_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let uri = self.uri();
        let mut cmd = Command::new("virsh");
        cmd.env("LC_ALL", "C").arg("-c").arg(&uri).args(args);
        let out = run_with_timeout(&mut cmd, timeout)
            .with_context(|| format!("virsh {args:?} (uri {uri})"))?;
        if !out.status.success() {
            bail!(
                "virsh {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).with_context(|| format!("virsh {args:?}: non-UTF-8 output"))
    }

    /// SIGKILLs libvirtd (and reaps it). The guests keep running. No-op if it is not running.
    pub fn kill(&mut self) {
        let mut guard = self.child_lock();
        if let Some(mut child) = guard.take() {
            if let Err(e) = child.kill() {
                eprintln!("PrivateLibvirtd {:?}: kill libvirtd: {e}", self.name);
            }
            if let Err(e) = child.wait() {
                eprintln!("PrivateLibvirtd {:?}: wait libvirtd: {e}", self.name);
            }
        }
    }

    /// Starts libvirtd again with the same directories and namespace and waits until it
    /// answers; running guests are found again. Kills the current libvirtd first if it is
    /// still running.
    pub fn restart(&mut self) -> Result<()> {
        let t0 = Instant::now();
        self.kill();
        self.spawn_and_wait()?;
        eprintln!(
            "PrivateLibvirtd {:?}: restarted in {:.2?}",
            self.name,
            t0.elapsed()
        );
        Ok(())
    }

    /// libvirt's view in the master's shape: (uuid, name, state), sorted.
    pub fn inventory(&self) -> Result<Vec<(String, String, String)>> {
        let mut v: Vec<_> = self
            .list_all()?
            .into_iter()
            .map(|d| (d.uuid, d.name, d.state))
            .collect();
        v.sort();
        Ok(v)
    }

    /// Every domain (active and inactive), sorted by uuid, with its state as one lower-case
    /// word (see [`DomainInfo::state`]).
    pub fn list_all(&self) -> Result<Vec<DomainInfo>> {
        let list = self.virsh(&["list", "--all", "--uuid", "--name"])?;
        let mut names: BTreeMap<String, String> = BTreeMap::new(); // name -> uuid
        for line in list.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (uuid, name) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("unexpected `virsh list --uuid --name` line {line:?}"))?;
            names.insert(name.trim().to_string(), uuid.to_string());
        }
        if names.is_empty() {
            return Ok(Vec::new());
        }
        // One call for all states: `state.state` is virDomainState as a number.
        let stats = self.virsh(&["domstats", "--state"])?;
        let states: BTreeMap<String, String> = parse_domstats(&stats)
            .into_iter()
            .filter_map(|(name, kv)| {
                let n: u32 = kv.get("state.state")?.parse().ok()?;
                Some((name, state_word_from_number(n).to_string()))
            })
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for (name, uuid) in names {
            let state = match states.get(&name) {
                Some(s) => s.clone(),
                // Defined between the two calls, or gone: ask once more, skip if gone.
                None => match self.domstate(&uuid) {
                    Ok(s) => s,
                    Err(_) => continue,
                },
            };
            out.push(DomainInfo { uuid, name, state });
        }
        out.sort();
        Ok(out)
    }

    /// `virsh domstate DOM` mapped to one word (see [`state_word_from_virsh`]).
    pub fn domstate(&self, dom: &str) -> Result<String> {
        let out = self.virsh(&["domstate", dom])?;
        let word = out.trim();
        state_word_from_virsh(word)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("unknown `virsh domstate {dom}` output {word:?}"))
    }

    /// `virsh domstats <flags> DOM` as a map (`"block.0.wr.reqs" -> "12"`), e.g.
    /// `lv.domstats("g1", &["--interface", "--block"])`.
    pub fn domstats(&self, dom: &str, flags: &[&str]) -> Result<BTreeMap<String, String>> {
        let mut args = vec!["domstats"];
        args.extend_from_slice(flags);
        args.push(dom);
        let out = self.virsh(&args)?;
        parse_domstats(&out)
            .into_iter()
            .next()
            .map(|(_, kv)| kv)
            .ok_or_else(|| anyhow!("virsh {args:?}: no `Domain:` block in {out:?}"))
    }

    /// The live (non-zombie) QEMU processes of this instance, sorted: the processes of its
    /// network namespace whose name starts with `qemu`. They survive [`kill`](Self::kill).
    pub fn qemu_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .instance_pids()
            .into_iter()
            .filter(|&p| process_comm(p).is_some_and(|c| c.starts_with("qemu")))
            .filter(|&p| process_alive(p))
            .collect();
        pids.sort_unstable();
        pids
    }

    // ---- internals ----

    fn child_lock(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock cannot leave the Option inconsistent.
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn caps_dir(&self) -> PathBuf {
        self.dir.join("cache").join("qemu").join("capabilities")
    }

    fn prepare_dir(&self) -> Result<()> {
        for sub in ["etc", "run", "lib", "cache", "log", "sock", "images"] {
            fs::create_dir(self.dir.join(sub))
                .with_context(|| format!("creating {}/{sub}", self.dir.display()))?;
        }
        // See the module doc: libvirtd's run directory is a tmpfs, as on a real host.
        let run = self.dir.join("run");
        run_checked(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "mode=0755,size=64m"])
                .arg(RUN_FS_NAME)
                .arg(&run),
        )?;
        let d = self.dir.display();
        let host_uuid = read_kernel_uuid()?;
        write_file(
            &self.dir.join("etc/libvirtd.conf"),
            &format!(
                "unix_sock_dir = \"{d}/sock\"\n\
                 unix_sock_rw_perms = \"0770\"\n\
                 auth_unix_ro = \"none\"\n\
                 auth_unix_rw = \"none\"\n\
                 log_outputs = \"3:file:{d}/libvirtd.log\"\n\
                 host_uuid = \"{host_uuid}\"\n"
            ),
        )?;
        write_file(
            &self.dir.join("etc/qemu.conf"),
            "user = \"root\"\n\
             group = \"root\"\n\
             dynamic_ownership = 0\n\
             security_driver = \"none\"\n\
             stdio_handler = \"file\"\n\
             cgroup_controllers = [ ]\n",
        )?;
        Ok(())
    }

    fn create_netns(&mut self) -> Result<()> {
        {
            // Serialised machine-wide: the first `ip netns add` on a machine sets up the
            // /run/netns mount, and two doing it at once can stack two mounts.
            let _lock = MachineLock::acquire()?;
            run_checked(Command::new("ip").args(["netns", "add", &self.netns]))?;
        }
        let meta = fs::metadata(Path::new("/run/netns").join(&self.netns))
            .with_context(|| format!("stat /run/netns/{}", self.netns))?;
        self.netns_id = Some((meta.dev(), meta.ino()));
        run_checked(Command::new("ip").args(["-n", &self.netns, "link", "set", "lo", "up"]))?;
        Ok(())
    }

    /// Spawns libvirtd and waits for the socket and a successful `virsh list --all`.
    fn spawn_and_wait(&mut self) -> Result<()> {
        let log_path = self.dir.join("libvirtd.stdout.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log2 = log.try_clone().context("dup log file")?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(["unshare", "-m", "--propagation", "private"])
            .args(["sh", "-c", LAUNCH_SCRIPT, "sh"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .context("spawning `ip netns exec … libvirtd`")?;
        *self.child_lock() = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        let sock = self.socket_path();
        let mut last_err = anyhow!("socket {} never appeared", sock.display());
        let mut delay = Duration::from_millis(5);
        loop {
            if !self.is_running() {
                let status = self
                    .child_lock()
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .map_or_else(|| "unknown status".to_string(), |s| s.to_string());
                self.kill();
                bail!(
                    "libvirtd exited during startup ({status}).\n--- {}:\n{}\n--- {}:\n{}",
                    log_path.display(),
                    tail(&log_path, 30),
                    self.log_path().display(),
                    tail(&self.log_path(), 30)
                );
            }
            if sock.exists() {
                match self.virsh(&["list", "--all"]) {
                    Ok(_) => return Ok(()),
                    Err(e) => last_err = e,
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(last_err.context(format!(
                    "libvirtd did not answer within {START_TIMEOUT:?}; log tail:\n{}",
                    tail(&self.log_path(), 30)
                )));
            }
            thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(100));
        }
    }

    /// Every process of this instance: members of its network namespace, plus any `qemu*` or
    /// `libvirtd` process whose command line mentions the instance directory.
    fn instance_pids(&self) -> BTreeSet<u32> {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut pids = BTreeSet::new();
        for pid in all_pids() {
            if pid == std::process::id() {
                continue;
            }
            if let Some(id) = self.netns_id {
                if process_netns(pid) == Some(id) {
                    pids.insert(pid);
                    continue;
                }
            }
            let is_ours_kind =
                process_comm(pid).is_some_and(|c| c.starts_with("qemu") || c == "libvirtd");
            if is_ours_kind && process_cmdline(pid).is_some_and(|c| c.contains(&dir)) {
                pids.insert(pid);
            }
        }
        pids
    }

    /// `virsh destroy` of every running domain, all at once.
    fn destroy_all_domains(&self) -> Result<()> {
        // Short timeout: a hung daemon must not hold up Drop (its guests get SIGKILL anyway).
        let uuids = self.virsh_with_timeout(&["list", "--uuid"], Duration::from_secs(10))?;
        let uri = self.uri();
        let mut children = Vec::new();
        for uuid in uuids.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let child = Command::new("virsh")
                .env("LC_ALL", "C")
                .args(["-c", &uri, "destroy", uuid])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning virsh destroy")?;
            children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for mut child in children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(10)),
                }
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        let t0 = Instant::now();
        if self.is_running() {
            if let Err(e) = self.destroy_all_domains() {
                eprintln!("PrivateLibvirtd {:?}: destroying domains: {e:#}", self.name);
            }
        }
        self.kill();
        // Whatever is left (qemu after a libvirtd kill, a destroy that timed out, …).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left: Vec<u32> = self
                .instance_pids()
                .into_iter()
                .filter(|&p| process_alive(p))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                eprintln!(
                    "PrivateLibvirtd {:?}: processes {left:?} survive SIGKILL",
                    self.name
                );
                break;
            }
            for pid in left {
                // SAFETY: plain syscall; pid is a live process of this instance.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(20));
        }
        if self.netns_id.is_some() {
            if let Err(e) = run_checked(Command::new("ip").args(["netns", "del", &self.netns])) {
                eprintln!("PrivateLibvirtd {:?}: {e:#}", self.name);
            }
        }
        if keep_dirs() {
            // The tmpfs goes with the unmount: what it held is kept beside it.
            let kept = self.dir.join("run-kept");
            let copied = Command::new("cp")
                .arg("-a")
                .arg(self.dir.join("run"))
                .arg(&kept)
                .status();
            if !copied.is_ok_and(|s| s.success()) {
                eprintln!(
                    "PrivateLibvirtd {:?}: could not copy run/ to {}",
                    self.name,
                    kept.display()
                );
            }
            unmount_run(&self.dir);
            eprintln!(
                "PrivateLibvirtd {:?}: VMWATCH_KEEP_TEST_DIRS set, keeping {} (run/ is in run-kept/)",
                self.name,
                self.dir.display()
            );
        } else if let Err(e) = remove_instance_dir(&self.dir) {
            if self.dir.exists() {
                eprintln!(
                    "PrivateLibvirtd {:?}: removing {}: {e}",
                    self.name,
                    self.dir.display()
                );
            }
        }
        owned_instances().remove(&self.netns);
        eprintln!(
            "PrivateLibvirtd {:?}: cleaned up in {:.2?} (lived {:.2?})",
            self.name,
            t0.elapsed(),
            self.started.elapsed()
        );
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        // cleanup() does not panic by construction; this is belt and braces, since a panic in
        // Drop during unwinding aborts the whole test binary.
        let cleanup = std::panic::AssertUnwindSafe(|| self.cleanup());
        if std::panic::catch_unwind(cleanup).is_err() {
            eprintln!("PrivateLibvirtd: panic during cleanup (ignored)");
        }
    }
}

impl std::fmt::Debug for PrivateLibvirtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateLibvirtd")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("netns", &self.netns)
            .field("pid", &self.pid())
            .finish()
    }
}

/// Maps the state word `virsh domstate` prints to the harness's single word:
/// `running`, `idle`→`blocked`, `paused`, `in shutdown`→`shutdown`, `shut off`→`shutoff`,
/// `crashed`, `pmsuspended`, `no state`→`nostate`. `None` for anything else.
pub fn state_word_from_virsh(virsh_word: &str) -> Option<&'static str> {
    Some(match virsh_word.trim() {
        "running" => "running",
        "idle" | "blocked" => "blocked",
        "paused" => "paused",
        "in shutdown" => "shutdown",
        "shut off" => "shutoff",
        "crashed" => "crashed",
        "pmsuspended" => "pmsuspended",
        "no state" => "nostate",
        _ => return None,
    })
}

/// Maps libvirt's `virDomainState` number (`state.state` in `virsh domstats`) to the same
/// words as [`state_word_from_virsh`]. Unknown numbers map to `nostate`.
pub fn state_word_from_number(state: u32) -> &'static str {
    match state {
        1 => "running",
        2 => "blocked",
        3 => "paused",
        4 => "shutdown",
        5 => "shutoff",
        6 => "crashed",
        7 => "pmsuspended",
        _ => "nostate",
    }
}

/// Parses `virsh domstats` output into (domain name, key → value) in output order.
pub fn parse_domstats(out: &str) -> Vec<(String, BTreeMap<String, String>)> {
    let mut res: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Domain: ") {
            let name = rest
                .strip_prefix('\'')
                .and_then(|r| r.strip_suffix('\''))
                .unwrap_or(rest);
            res.push((name.to_string(), BTreeMap::new()));
        } else if let Some((k, v)) = line.trim().split_once('=') {
            if let Some((_, kv)) = res.last_mut() {
                kv.insert(k.to_string(), v.to_string());
            }
        }
    }
    res
}

/// A random uuid from `/proc/sys/kernel/random/uuid`.
pub(crate) fn read_kernel_uuid() -> Result<String> {
    let s = fs::read_to_string("/proc/sys/kernel/random/uuid")
        .context("reading /proc/sys/kernel/random/uuid")?;
    Ok(s.trim().to_string())
}

pub(crate) fn write_file(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).with_context(|| format!("writing {}", path.display()))
}

/// The source name of the tmpfs mounted on an instance's `run/` (as `mount` lists it).
const RUN_FS_NAME: &str = "vmwatch-lv-run";

/// Unmounts the tmpfs on `dir/run`, if it is mounted. `MNT_DETACH`: a process of the instance
/// that survived SIGKILL must not leave the mount behind. Not mounted (`EINVAL`) or gone
/// (`ENOENT`) is fine.
fn unmount_run(dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let run = dir.join("run");
    let Ok(c) = std::ffi::CString::new(run.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; umount2 does not keep the pointer.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            eprintln!("PrivateLibvirtd: unmounting {}: {e}", run.display());
        }
    }
}

/// Removes an instance directory, its `run/` tmpfs first: `remove_dir_all` would empty the
/// mount and then fail on it (EBUSY), leaving both behind.
fn remove_instance_dir(dir: &Path) -> std::io::Result<()> {
    unmount_run(dir);
    fs::remove_dir_all(dir)
}

fn keep_dirs() -> bool {
    std::env::var("VMWATCH_KEEP_TEST_DIRS").is_ok_and(|v| v == "1")
}

/// Runs a command to completion with a timeout, collecting stdout and stderr.
fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let t_out = read_all(stdout.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let t_err = read_all(stderr.map(|p| Box::new(p) as Box<dyn Read + Send>));
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {timeout:?}");
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(20));
    };
    let stdout = t_out
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = t_err
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a short command (ip …); error with its stderr if it fails.
fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = run_with_timeout(cmd, Duration::from_secs(30))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The last `n` lines of a file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let s = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

fn all_pids() -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn process_netns(pid: u32) -> Option<(u64, u64)> {
    let m = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((m.dev(), m.ino()))
}

fn process_comm(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end().to_string())
}

fn process_cmdline(pid: u32) -> Option<String> {
    let b = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&b).replace('\0', " "))
}

/// Exists and is not a zombie (a killed orphan stays a zombie until init reaps it).
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ..." — comm may contain spaces and parentheses.
    match stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
    {
        Some(state) => state != "Z" && state != "X",
        None => false,
    }
}

/// An exclusive `flock` on `<tmp>/vmwatch-lv.lock`, across threads and processes.
struct MachineLock(fs::File);

impl MachineLock {
    fn acquire() -> Result<Self> {
        let path = std::env::temp_dir().join("vmwatch-lv.lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: valid fd owned by `f`.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(MachineLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("flock {}", path.display()));
            }
        }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd; closing would release it anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Cleans up instances whose owning process died without running Drop. Best effort.
fn reap_stale_instances(base: &Path) {
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|r| r.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if instance_in_use(owner, &name) {
                continue;
            }
            eprintln!("PrivateLibvirtd: reaping stale netns {name} (owner pid {owner} is gone)");
            if let Ok(m) = fs::metadata(entry.path()) {
                let id = (m.dev(), m.ino());
                for _ in 0..50 {
                    let pids: Vec<u32> = all_pids()
                        .into_iter()
                        .filter(|&p| process_netns(p) == Some(id) && process_alive(p))
                        .collect();
                    if pids.is_empty() {
                        break;
                    }
                    for p in pids {
                        // SAFETY: plain syscall.
                        unsafe { libc::kill(p as libc::pid_t, libc::SIGKILL) };
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = run_checked(Command::new("ip").args(["netns", "del", &name]));
        }
    }
    if keep_dirs() {
        return;
    }
    let mut bases = vec![std::env::temp_dir()];
    if !bases.iter().any(|b| b == base) {
        bases.push(base.to_path_buf());
    }
    for base in bases {
        let Ok(rd) = fs::read_dir(&base) else {
            continue;
        };
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(DIR_PREFIX) {
                continue;
            }
            // vmwatch-lv-<label>-<pid>-<counter>
            let mut parts = name.rsplit('-');
            let (Some(counter), Some(pid)) = (parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(owner), Ok(counter)) = (pid.parse::<u32>(), counter.parse::<u32>()) else {
                continue;
            };
            if instance_in_use(owner, &format!("{NETNS_PREFIX}{owner}-{counter}")) {
                continue;
            }
            eprintln!("PrivateLibvirtd: removing stale {}", entry.path().display());
            let _ = remove_instance_dir(&entry.path());
        }
    }
}

/// The machine-wide copy of the QEMU capability cache (see the module doc).
struct CapsCache {
    dir: PathBuf,
}

impl CapsCache {
    fn from_env() -> Option<Self> {
        match std::env::var("VMWATCH_LIBVIRT_CAPS_CACHE") {
            Ok(v) if v == "off" || v == "0" => None,
            Ok(v) if !v.is_empty() => Some(CapsCache { dir: v.into() }),
            _ => Some(CapsCache {
                dir: std::env::temp_dir().join("vmwatch-lv-capcache"),
            }),
        }
    }

    fn xml_files(dir: &Path) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "xml"))
            .collect()
    }

    /// Best effort: a failure only costs a probe.
    fn copy_in(&self, caps_dir: &Path) {
        let files = Self::xml_files(&self.dir);
        if files.is_empty() {
            return;
        }
        if let Err(e) = fs::create_dir_all(caps_dir) {
            eprintln!("PrivateLibvirtd: creating {}: {e}", caps_dir.display());
            return;
        }
        for f in files {
            if let Some(name) = f.file_name() {
                if let Err(e) = fs::copy(&f, caps_dir.join(name)) {
                    eprintln!("PrivateLibvirtd: copying {}: {e}", f.display());
                }
            }
        }
    }

    /// Saves every file of the instance's cache that differs from the shared copy.
    fn copy_out(&self, caps_dir: &Path) {
        let files = Self::xml_files(caps_dir);
        if files.is_empty() {
            return;
        }
        if let Err(e) = fs::create_dir_all(&self.dir) {
            eprintln!("PrivateLibvirtd: creating {}: {e}", self.dir.display());
            return;
        }
        for f in files {
            let (Some(name), Ok(content)) = (f.file_name(), fs::read(&f)) else {
                continue;
            };
            let dest = self.dir.join(name);
            if fs::read(&dest).is_ok_and(|old| old == content) {
                continue;
            }
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
            let res = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .and_then(|mut t| t.write_all(&content).and_then(|_| t.sync_all()))
                .and_then(|_| fs::rename(&tmp, &dest));
            if let Err(e) = res {
                let _ = fs::remove_file(&tmp);
                eprintln!("PrivateLibvirtd: saving {}: {e}", dest.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_words() {
        for (virsh, word) in [
            ("running", "running"),
            ("idle", "blocked"),
            ("paused", "paused"),
            ("in shutdown", "shutdown"),
            ("shut off", "shutoff"),
            ("crashed", "crashed"),
            ("pmsuspended", "pmsuspended"),
            ("no state", "nostate"),
        ] {
            assert_eq!(state_word_from_virsh(virsh), Some(word), "{virsh}");
        }
        assert_eq!(state_word_from_virsh("bogus"), None);
        let numbered: Vec<&str> = (0..8).map(state_word_from_number).collect();
        assert_eq!(
            numbered,
            [
                "nostate",
                "running",
                "blocked",
                "paused",
                "shutdown",
                "shutoff",
                "crashed",
                "pmsuspended"
            ]
        );
    }

    #[test]
    fn domstats_parsing() {
        let out = "Domain: 'a b'\n  state.state=1\n  state.reason=1\n\n\
                   Domain: 'c'\n  block.0.wr.reqs=12\n\n";
        let p = parse_domstats(out);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "a b");
        assert_eq!(p[0].1.get("state.state").map(String::as_str), Some("1"));
        assert_eq!(p[1].0, "c");
        assert_eq!(
            p[1].1.get("block.0.wr.reqs").map(String::as_str),
            Some("12")
        );
    }

    #[test]
    fn alive_self_and_not_dead() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(u32::MAX));
    }
}
