//! A private PostgreSQL cluster per test process (SPEC §12): `initdb` and `pg_ctl` from
//! Debian's `postgresql` package, run as the `postgres` user (initdb refuses root) into a
//! directory of its own, on a loopback port and a unix socket there. Never the machine's own
//! service. Loopback connections need the superuser's password (scram), so every test also
//! goes through `database_password_file`.
//!
//! The cluster starts on first use and is stopped (`pg_ctl stop -m immediate`) and deleted
//! when the test process exits; one left behind by a killed test process is stopped by the
//! next one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, Context as _, Result};
use vmwatch_master::store::{Conn, Database, Purpose};

/// The superuser's password in every private cluster.
const PASSWORD: &str = "vmwatch-test-pw";

/// Whether the suites run their masters on PostgreSQL (`VMWATCH_TEST_DATABASE=postgres`).
pub fn selected() -> bool {
    std::env::var("VMWATCH_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

/// The newest PostgreSQL's programs (`/usr/lib/postgresql/N/bin`).
pub fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .context("no /usr/lib/postgresql/N/bin/initdb")
}

/// A running private cluster.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The superuser's password file (mode 0600, for `database_password_file`).
    pub password_file: PathBuf,
    bin: PathBuf,
}

static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();

/// The process's cluster, started on first use.
pub fn cluster() -> Result<&'static Cluster> {
    match SHARED.get_or_init(|| {
        let c = Cluster::start(&format!("vmwatch-pg-{}", std::process::id()))
            .map_err(|e| format!("{e:#}"))?;
        extern "C" fn stop_at_exit() {
            if let Some(Ok(c)) = SHARED.get() {
                c.destroy();
            }
        }
        // SAFETY: registering a plain function with no arguments; it runs once at exit.
        unsafe { libc::atexit(stop_at_exit) };
        Ok(c)
    }) {
        Ok(c) => Ok(c),
        Err(e) => bail!("private PostgreSQL cluster: {e}"),
    }
}

fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(program));
    c
}

fn run(mut c: Command, what: &str) -> Result<()> {
    let out = c.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Cluster {
    /// initdb + pg_ctl start into `/tmp/<name>` (replacing what is there).
    pub fn start(name: &str) -> Result<Cluster> {
        let bin = bin_dir()?;
        reap_orphans(&bin);
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let pwfile = dir.join("superuser.pw");
        crate::product::write_private(&pwfile, PASSWORD)?;
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:postgres"]).arg(&dir);
        run(chown, "chown")?;
        let mut initdb = as_postgres(&bin, "initdb");
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "-E", "UTF8", "--locale=C.UTF-8"]);
        run(initdb, "initdb")?;
        // Readable by the test process (root) as well, for database_password_file.
        let password_file = dir.join("password");
        crate::product::write_private(&password_file, PASSWORD)?;
        let port = crate::product::free_port();
        let c = Cluster {
            dir,
            port,
            password_file,
            bin,
        };
        c.pg_ctl_start()?;
        Ok(c)
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let mut start = as_postgres(&self.bin, "pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 \
                 -c shared_buffers=1GB -c max_wal_size=4GB -c checkpoint_timeout=15min \
                 -c synchronous_commit=on",
                self.port,
                self.dir.display()
            ))
            .arg("start");
        run(start, "pg_ctl start")
    }

    /// Stops the server (`fast`: open transactions are rolled back, clients cut off).
    pub fn stop(&self) -> Result<()> {
        let mut stop = as_postgres(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "fast", "stop"]);
        run(stop, "pg_ctl stop")
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn restart(&self) -> Result<()> {
        self.pg_ctl_start()
    }

    fn destroy(&self) {
        let mut stop = as_postgres(&self.bin, "pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "immediate", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A URL on the loopback port (the password comes from [`Cluster::password_file`]).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{dbname}?sslmode=disable",
            self.port
        )
    }

    /// A new, empty database; returns its `database=` URL.
    pub fn create_database(&self, prefix: &str) -> Result<String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}_{}_{}",
            prefix.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
        .to_lowercase();
        let mut admin = Conn::open(&self.database("postgres")?, Purpose::Migrate)?;
        admin
            .batch(&format!("CREATE DATABASE {name}"))
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// `database=` of `dbname` as the master would parse it.
    pub fn database(&self, dbname: &str) -> Result<Database> {
        Database::parse(&self.url(dbname), Some(&self.password_file)).map_err(anyhow::Error::msg)
    }
}

/// A cluster a test started for itself goes with it (the process's shared one at exit).
impl Drop for Cluster {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Stops clusters of test processes that are gone.
fn reap_orphans(bin: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // vmwatch-pg-<pid> and vmwatch-pg-<purpose>-<pid>.
        let Some(pid) = name
            .strip_prefix("vmwatch-pg-")
            .and_then(|p| p.rsplit('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let mut stop = as_postgres(bin, "pg_ctl");
        stop.arg("-D")
            .arg(e.path().join("data"))
            .args(["-w", "-m", "immediate", "stop"]);
        let _ = stop.output();
        let _ = std::fs::remove_dir_all(e.path());
    }
}
