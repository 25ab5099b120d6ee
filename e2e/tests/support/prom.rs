//! A real Prometheus (Debian's) for the e2e tests, and the dashboards' queries run on it.

#![allow(dead_code)] // Each test binary uses a different part.
// Test support: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::mesh;

/// A Prometheus on a loopback port, killed on drop.
pub struct Prometheus {
    pub port: u16,
    _child: mesh::Kill,
}

/// Starts Prometheus in `dir` with `config` (checked by `promtool check config` first).
pub fn start(dir: &Path, config: &str) -> Prometheus {
    let file = dir.join("prometheus.yml");
    std::fs::write(&file, config).unwrap();
    let check =
        mesh::run(Command::new("promtool").args(["check", "config", file.to_str().unwrap()]));
    assert!(check.status.success(), "{}", mesh::text(&check));
    let port = mesh::free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian)");
    Prometheus {
        port,
        _child: mesh::Kill(child),
    }
}

/// An instant query; the result vector (empty on any error, which the caller reports).
pub fn query(prom: u16, expr: &str) -> Vec<Value> {
    let out = mesh::run(Command::new("curl").args([
        "-sS",
        "-G",
        "--max-time",
        "10",
        "--data-urlencode",
        &format!("query={expr}"),
        &format!("http://127.0.0.1:{prom}/api/v1/query"),
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Panels of a dashboard, rows' panels included.
pub fn panels(ps: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in ps {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(panels(inner));
        }
    }
    out
}

/// A panel query with the dashboard's variables replaced (every namespace and workload).
pub fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$namespace", ".*")
        .replace("$workload", ".*")
}

/// The dashboard `name` (`charts/medmesh/dashboards/<name>.json`).
pub fn dashboard(name: &str) -> Value {
    let path = format!(
        "{}/../charts/medmesh/dashboards/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Every (panel title, query with variables substituted) of `dash`.
pub fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash["panels"].as_array().unwrap()) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap_or("").to_owned(),
                substitute(t["expr"].as_str().unwrap()),
            ));
        }
    }
    out
}

/// Metrics of the archive clusters' own daemons: their panels are run by the archive cluster
/// test, which has real ipfs-cluster peers to scrape.
pub const IPFS_CLUSTER_METRICS: &str = "ipfscluster_";
