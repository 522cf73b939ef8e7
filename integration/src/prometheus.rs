//! A real Prometheus (Debian's package) scraping a target every second,
//! with its own config, storage and port in a temporary directory.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prometheus; killed and its directory removed on drop.
#[derive(Debug)]
pub struct Prometheus {
    dir: tempfile::TempDir,
    child: Child,
    /// Its web address (`127.0.0.1:port`).
    pub addr: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`host:port`) every second.
    pub async fn start(target: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("hb-prom-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: hyperbox\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .expect("write prometheus config");
        let addr = format!("127.0.0.1:{}", crate::agent::free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let p = Prometheus { dir, child, addr };
        let start = Instant::now();
        while reqwest::get(format!("http://{}/-/ready", p.addr))
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready; log:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the result vector.
    pub async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("http://{}/api/v1/query", self.addr))
            .query(&[("query", q)])
            .send()
            .await
            .expect("query prometheus")
            .json()
            .await
            .expect("prometheus JSON");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// `/api/v1/targets`.
    pub async fn targets(&self) -> serde_json::Value {
        reqwest::get(format!("http://{}/api/v1/targets", self.addr))
            .await
            .expect("targets")
            .json()
            .await
            .expect("targets JSON")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
