//! SRE observability on real infrastructure: a real Prometheus (Debian's) scrapes the real
//! components the way the chart's monitors do (jobs `medmesh-sidecar`, `medmesh-ledger`,
//! `medmesh-operator`; labels `namespace`, `pod`, `workload`), with the chart's alerting rules
//! loaded.
//!
//! The mesh: pod A (the scanner's sidecar, DCMTK, curl) and pod B (Orthanc with DICOMweb behind
//! an auditing and archiving sidecar, a 3-replica Raft ledger), network namespaces with the
//! sidecars' iptables interception; Prometheus in the root namespace reaches each pod over a
//! link of its own, and the operator replicas of `scripts/cluster-e2e up` on loopback.
//!
//! After real traffic (storescu and STOW-RS through the mesh, a plaintext connection and a
//! TLS client without a workload certificate, both refused), every panel query of every
//! dashboard in `charts/medmesh/dashboards` (variables substituted) returns at least one
//! series, and every variable finds its label. Then the ledger stops while transfers go on:
//! "audit delivery failing" and "checkpoint stale" fire in that Prometheus, and resolve once
//! the ledger is back. To keep the test short the rules are loaded with their `for` durations
//! and windows shortened (`fast_rules`); their full durations are unit-tested by
//! `scripts/check-rules`.
//!
//! Needs the environment of `scripts/cluster-e2e up` (the operators' metrics), as the cluster
//! tests do: it fails, it does not skip, without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;
#[path = "support/prom.rs"]
mod prom;

use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Lab, link_root, ok, require};
use prom::{panels, query, substitute};

const NS_A: &str = "radiology";
const NS_B: &str = "pacs";
const PACS: &str = "spiffe://medmesh.local/ns/pacs/sa/orthanc";

/// The chart's rules with every `for` and window shortened (minutes become seconds), and the
/// checkpoint age threshold from 5 minutes to 8 seconds. Each replacement must apply, so a
/// changed rule file fails here rather than being tested unscaled.
fn fast_rules(src: &str) -> String {
    let mut out = src.to_owned();
    for (from, to) in [
        ("for: 1m", "for: 2s"),
        ("for: 2m", "for: 4s"),
        ("for: 5m", "for: 5s"),
        ("for: 10m", "for: 5s"),
        ("for: 15m", "for: 5s"),
        ("for: 1h", "for: 5s"),
        ("[5m]", "[20s]"),
        ("[10m]", "[20s]"),
        ("[15m]", "[20s]"),
        ("> 300", "> 8"),
    ] {
        assert!(out.contains(from), "the rules no longer contain {from:?}");
        out = out.replace(from, to);
    }
    out
}

/// Alerts by name and state (`pending`, `firing`) from `/api/v1/alerts`.
fn alerts(prom: u16) -> Vec<(String, String, serde_json::Value)> {
    let out = mesh::run(Command::new("curl").args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{prom}/api/v1/alerts"),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["data"]["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            (
                a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                a["state"].as_str().unwrap_or("").to_owned(),
                a["labels"].clone(),
            )
        })
        .collect()
}

fn firing(prom: u16, name: &str) -> bool {
    alerts(prom)
        .iter()
        .any(|(n, s, _)| n == name && s == "firing")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

struct Mesh {
    lab: Lab,
    ledgers: Vec<std::path::PathBuf>,
}

impl Mesh {
    fn start_ledgers(&mut self) {
        let b = self.lab.b.clone();
        let bin = mesh::bin("medmesh-ledger");
        for (i, cfg) in self.ledgers.clone().iter().enumerate() {
            self.lab.spawn(
                &b,
                &format!("ledger-{i}"),
                false,
                &[
                    bin.to_str().unwrap(),
                    "run",
                    "--config",
                    cfg.to_str().unwrap(),
                ],
            );
        }
        self.lab.wait(
            &b,
            "curl -sf http://127.0.0.1:19443/ready",
            "the ledger in B",
        );
    }

    fn stop_ledgers(&self) {
        // By the full path of each replica's configuration: this run's replicas only.
        for cfg in &self.ledgers {
            let _ = Command::new("pkill")
                .args([
                    "-KILL",
                    "-f",
                    &format!("medmesh-ledger run --config {}", cfg.display()),
                ])
                .status();
        }
    }

    /// storescu from A of the files in `dir` to Orthanc in B, through the mesh.
    fn storescu(&self, dir: &str) {
        let out = self.lab.exec(
            &self.lab.a,
            &format!("storescu -aec ORTHANC {} 4242 {dir}/*.dcm", self.lab.ip_b),
        );
        assert!(
            out.status.success(),
            "storescu: {}\nsidecar B: {}",
            mesh::text(&out),
            self.lab.log("sidecar-b")
        );
    }
}

#[test]
fn a_real_prometheus_sees_every_panel_and_the_ledger_outage_alerts() {
    require(&[
        "ip",
        "iptables-nft",
        "Orthanc",
        "storescu",
        "curl",
        "openssl",
        "prometheus",
        "setpriv",
    ]);
    let operators = std::env::var("MEDMESH_E2E_OPERATORS").expect(
        "MEDMESH_E2E_OPERATORS is not set: this test scrapes the operators of \
         `eval \"$(scripts/k8s up)\" && eval \"$(scripts/cluster-e2e up)\"` (scripts/check does)",
    );
    let lab = Lab::new("o");
    let sidecar = mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap();
    let (certs, signing) = lab.mesh_files(7);
    let (c, d) = (
        certs.display().to_string(),
        lab.dir.path().display().to_string(),
    );
    lab.write_pacs_policies();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    ok(&format!("ip netns exec {a} {sidecar} init --mode nft"));
    // The ledger replicas' admin ports are scraped directly, as a kubelet probes them.
    ok(&format!(
        "ip netns exec {b} {sidecar} init --mode nft --skip-inbound-ports 19443,19444,19445"
    ));
    let recipient = mesh::run(
        Command::new(mesh::bin("medmesh"))
            .args(["dev", "archive-key", "--out"])
            .arg(lab.path("archive.key")),
    );
    assert!(recipient.status.success(), "{}", mesh::text(&recipient));
    let recipient = String::from_utf8(recipient.stdout)
        .unwrap()
        .trim()
        .to_owned();
    std::fs::create_dir_all(lab.path("store")).unwrap();
    ok(&format!("chmod 777 {}", lab.path("store").display()));

    // A 3-replica Raft ledger in B on loopback; admin ports on every address of B.
    let peers = "[\"127.0.0.1:18443\", \"127.0.0.1:18444\", \"127.0.0.1:18445\"]";
    let mut ledgers = Vec::new();
    for i in 0..3 {
        let dir = lab.path(&format!("ledger-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("ledger.yaml");
        std::fs::write(
            &cfg,
            format!(
                "node_id: ledger-{i}\npeers: {peers}\norigin: medmesh.local/ledger\ndata_dir: {d}/ledger-{i}/data\n\
                 listen: 127.0.0.1:{api}\nadmin_listen: 0.0.0.0:{admin}\ntrust_domain: medmesh.local\n\
                 cert: {c}/medmesh.ledger.pem\nkey: {c}/medmesh.ledger-key.pem\ntrust_bundle: {c}/ca.pem\n\
                 signing_key: {s}\nappenders: [\"{PACS}\"]\nreaders: [\"spiffe://medmesh.local/ns/medmesh/sa/auditor\"]\n\
                 checkpoint_interval_ms: 100\n",
                api = 18443 + i,
                admin = 19443 + i,
                s = signing.display()
            ),
        )
        .unwrap();
        ledgers.push(cfg);
    }
    let mut m = Mesh { lab, ledgers };
    m.start_ledgers();

    // The sidecars, their admin listeners on every address (as injected: the kubelet probes,
    // Prometheus scrapes). B audits in spool mode and archives into a local store.
    for (ns, who, side) in [(&a, "radiology.scanner", "a"), (&b, "pacs.orthanc", "b")] {
        let mut args: Vec<String> = vec![
            sidecar.into(),
            "run".into(),
            format!("--cert={c}/{who}.pem"),
            format!("--key={c}/{who}-key.pem"),
            format!("--ca={c}/ca.pem"),
            "--trust-domain=medmesh.local".into(),
            format!("--policy={d}/policy-{side}.json"),
            "--admin-addr=0.0.0.0:15020".into(),
        ];
        if side == "b" {
            args.extend([
                "--ledger-url=https://127.0.0.1:18443".into(),
                format!("--ledger-key=@{d}/verifier.key"),
                format!("--audit-key={d}/uid.key"),
                "--audit-delivery=spool".into(),
                format!("--spool-dir={d}/spool"),
                format!("--archive-store={d}/store"),
                format!("--archive-recipients={recipient}"),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        m.lab.spawn(ns, &format!("sidecar-{side}"), true, &args);
    }
    m.lab
        .wait(&a, "curl -sf http://127.0.0.1:15020/ready", "sidecar in A");
    m.lab
        .wait(&b, "curl -sf http://127.0.0.1:15020/ready", "sidecar in B");
    m.lab.start_orthanc("");

    // Prometheus in the root namespace, a link into each pod.
    let (_, pod_a) = link_root(&a, 0);
    let (_, pod_b) = link_root(&b, 1);
    let rules = m.lab.path("medmesh.rules.yaml");
    std::fs::write(
        &rules,
        fast_rules(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../charts/medmesh/files/rules/medmesh.rules.yaml"
            ))
            .unwrap(),
        ),
    )
    .unwrap();
    let target = |addr: String, labels: &str| {
        format!("      - targets: [\"{addr}\"]\n        labels: {{{labels}}}\n")
    };
    let mut ops = String::new();
    for (name, addr) in operators.split(',').filter_map(|p| p.split_once('=')) {
        ops.push_str(&target(
            addr.to_owned(),
            &format!("namespace: medmesh, pod: {name}, workload: medmesh-operator"),
        ));
    }
    let mut ledger_targets = String::new();
    for i in 0..3 {
        ledger_targets.push_str(&target(
            format!("{pod_b}:{}", 19443 + i),
            &format!("namespace: {NS_B}, pod: ledger-{i}, workload: ledger"),
        ));
    }
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [\"{rules}\"]\n\
         scrape_configs:\n\
         \x20 - job_name: medmesh-sidecar\n    static_configs:\n{sa}{sb}\
         \x20 - job_name: medmesh-ledger\n    static_configs:\n{ledger_targets}\
         \x20 - job_name: medmesh-operator\n    static_configs:\n{ops}",
        rules = rules.display(),
        sa = target(
            format!("{pod_a}:15020"),
            &format!("namespace: {NS_A}, pod: scanner-0, workload: scanner")
        ),
        sb = target(
            format!("{pod_b}:15020"),
            &format!("namespace: {NS_B}, pod: orthanc-0, workload: orthanc")
        ),
    );
    let prometheus = prom::start(m.lab.dir.path(), &config);
    let prom = prometheus.port;
    wait_until("every target up", Duration::from_secs(60), || {
        let up = query(prom, "up");
        up.len() == 5 + operators.split(',').count() && up.iter().all(|s| s["value"][1] == "1")
    });

    // Traffic: DIMSE and STOW-RS through the mesh, refused plaintext, a TLS client without a
    // workload certificate.
    let send = m.lab.path("send");
    let out = mesh::run(
        Command::new(mesh::bin("medmesh"))
            .args(["dev", "dicom", "--count", "8", "--size", "64", "--out"])
            .arg(&send),
    );
    assert!(out.status.success(), "{}", mesh::text(&out));
    ok(&format!("chmod -R a+rX {}", send.display()));
    let send = send.display().to_string();
    m.storescu(&send);
    let first = std::fs::read_dir(&send)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut body = b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&std::fs::read(&first).unwrap());
    body.extend_from_slice(b"\r\n--b--\r\n");
    let stow_body = m.lab.path("stow.bin");
    std::fs::write(&stow_body, body).unwrap();
    let stow = m.lab.exec(
        &a,
        &format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' -u test:test \
             -H 'Content-Type: multipart/related; type=\"application/dicom\"; boundary=b' \
             --data-binary @{} http://{}:8042/dicom-web/studies",
            stow_body.display(),
            m.lab.ip_b
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&stow.stdout).trim(),
        "200",
        "STOW-RS: {}",
        mesh::text(&stow)
    );
    let _ = Command::new("curl")
        .args(["-s", "--max-time", "3", &format!("http://{pod_b}:4242/")])
        .output();
    let _ = Command::new("bash")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect {pod_b}:4242 -alpn medmesh/1 </dev/null >/dev/null 2>&1"
            ),
        ])
        .status();
    // Enough scrapes after the traffic for rates over 30 s.
    std::thread::sleep(Duration::from_secs(8));

    // Every panel query and every variable of every dashboard finds data.
    let mut empty = Vec::new();
    let mut checked = 0;
    let mut deferred = 0;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/medmesh/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 5, "dashboards in {dir}");
    for f in &files {
        let dash: serde_json::Value = serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap();
        let uid = dash["uid"].as_str().unwrap().to_owned();
        for v in dash["templating"]["list"].as_array().unwrap() {
            let Some(q) = v["query"]
                .as_str()
                .and_then(|q| q.strip_prefix("label_values("))
            else {
                continue;
            };
            let (selector, label) = q.trim_end_matches(')').rsplit_once(", ").unwrap();
            let expr = format!("count by ({label}) ({})", substitute(selector));
            checked += 1;
            if query(prom, &expr)
                .iter()
                .all(|s| s["metric"][label].is_null())
            {
                empty.push(format!("{uid}: variable {}: {expr}", v["name"]));
            }
        }
        for p in panels(dash["panels"].as_array().unwrap()) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = substitute(t["expr"].as_str().unwrap());
                // The archive cluster's own daemons are scraped by e2e/tests/archive_cluster.rs.
                if expr.contains(prom::IPFS_CLUSTER_METRICS) {
                    deferred += 1;
                    continue;
                }
                checked += 1;
                if query(prom, &expr).is_empty() {
                    empty.push(format!("{uid} / {}: {expr}", p["title"]));
                }
            }
        }
    }
    assert!(
        empty.is_empty(),
        "{} of {checked} queries found no series:\n{}",
        empty.len(),
        empty.join("\n")
    );
    assert_eq!(
        deferred, 5,
        "the archive cluster's queries run in archive_cluster.rs"
    );
    println!("{checked} dashboard queries each returned data ({deferred} run by archive_cluster)");
    let quiet: Vec<_> = alerts(prom)
        .into_iter()
        .filter(|(n, s, _)| {
            s == "firing"
                && matches!(
                    n.as_str(),
                    "MedmeshAuditDeliveryFailing" | "MedmeshLedgerCheckpointStale"
                )
        })
        .collect();
    assert!(quiet.is_empty(), "firing before the outage: {quiet:?}");

    // The ledger stops while transfers go on: records wait in B's spool.
    m.stop_ledgers();
    m.storescu(&send);
    wait_until(
        "MedmeshAuditDeliveryFailing and MedmeshLedgerCheckpointStale firing",
        Duration::from_secs(90),
        || {
            firing(prom, "MedmeshAuditDeliveryFailing")
                && firing(prom, "MedmeshLedgerCheckpointStale")
        },
    );
    let fired = alerts(prom);
    let delivery = fired
        .iter()
        .find(|(n, s, _)| n == "MedmeshAuditDeliveryFailing" && s == "firing")
        .unwrap();
    assert_eq!(delivery.2["namespace"], NS_B);
    assert_eq!(delivery.2["pod"], "orthanc-0");
    assert!(firing(prom, "MedmeshLedgerDown"), "{fired:?}");
    println!("fired during the outage: {fired:?}");

    // The ledger returns: the spool drains and both alerts resolve.
    m.start_ledgers();
    wait_until("both alerts resolved", Duration::from_secs(120), || {
        !alerts(prom).iter().any(|(n, _, _)| {
            matches!(
                n.as_str(),
                "MedmeshAuditDeliveryFailing" | "MedmeshLedgerCheckpointStale"
            )
        })
    });
    let spool = query(prom, "medmesh_sidecar_spool_depth{pod=\"orthanc-0\"}");
    assert_eq!(spool[0]["value"][1], "0", "{spool:?}");

    // The dashboards rendered from this Prometheus (traffic, outage, recovery): one PNG each.
    // MEDMESH_DASHBOARD_PREVIEW keeps them in a directory of one's choice.
    let previews = std::env::var("MEDMESH_DASHBOARD_PREVIEW")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| m.lab.path("previews"));
    let out = mesh::run(
        Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/dashboards-preview"
        ))
        .arg(format!("http://127.0.0.1:{prom}"))
        .arg(&previews)
        .arg("5"),
    );
    assert!(
        out.status.success(),
        "dashboards-preview: {}",
        mesh::text(&out)
    );
    let pngs: Vec<_> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(pngs.len(), 5, "{pngs:?}");
    for png in &pngs {
        let bytes = std::fs::read(png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{png}");
        assert!(bytes.len() > 20_000, "{png}: {} bytes", bytes.len());
    }
    println!("previews: {pngs:?}");
}
