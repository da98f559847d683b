//! A private Prometheus server per test (Debian's `prometheus`): its own config, data directory
//! and port on loopback, scraping the master every second and evaluating rules every second.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::product::free_port;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Whether Prometheus and promtool are installed; CI must not skip.
pub fn require_prometheus(test: &str) -> bool {
    let missing: Vec<String> = [PROMETHEUS, PROMTOOL]
        .iter()
        .filter(|p| !Path::new(p).exists())
        .map(|p| format!("{p} (Debian package prometheus)"))
        .collect();
    crate::ready_or_skip(test, &missing, "run scripts/install-deps.sh as root")
}

/// `promtool check rules FILE`: its output, or an error with it.
pub fn check_rules(file: &Path) -> Result<String> {
    let out = Command::new(PROMTOOL)
        .arg("check")
        .arg("rules")
        .arg(file)
        .output()
        .context("run promtool")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("promtool check rules {}: {text}", file.display());
    }
    Ok(text)
}

/// A running Prometheus; killed on drop.
pub struct Prometheus {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) as job `vmwatch-master` every second with `rules`.
    pub fn start(dir: &Path, target: &str, rules: &Path) -> Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [\"{}\"]\n\
                 scrape_configs:\n  - job_name: vmwatch-master\n    static_configs:\n      - targets: [\"{target}\"]\n",
                rules.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn prometheus")?;
        let p = Prometheus {
            port,
            dir: dir.to_owned(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ureq::get(&format!("http://127.0.0.1:{port}/-/ready"))
                .call()
                .is_ok()
            {
                return Ok(p);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "prometheus not ready within 60 s: {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        )
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let mut req = ureq::get(&format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in query {
            req = req.query(k, v);
        }
        let body: Value = match req.call() {
            Ok(r) => r.into_json()?,
            Err(ureq::Error::Status(_, r)) => r.into_json()?,
            Err(e) => return Err(e.into()),
        };
        if body["status"] != "success" {
            bail!("prometheus {path} {query:?}: {body}");
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result vector (`data.result`); an error names Prometheus' complaint.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        Ok(self.get("/api/v1/query", &[("query", expr)])?["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The alerts pending or firing now.
    pub fn alerts(&self) -> Result<Vec<Value>> {
        Ok(self.get("/api/v1/alerts", &[])?["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Whether `name` is firing (with every label of `labels`).
    pub fn firing(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.alerts().is_ok_and(|alerts| {
            alerts.iter().any(|a| {
                a["labels"]["alertname"] == name
                    && a["state"] == "firing"
                    && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            })
        })
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
