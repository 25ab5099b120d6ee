//! Traces on a real OTLP receiver: Jaeger v2 (all-in-one, built from the Go module proxy by
//! `scripts/jaeger`) receives the spans of the auditing sidecar and of the ledger.
//!
//! The mesh: pod A (DCMTK, curl, its sidecar) and pod B (Orthanc with DICOMweb behind a sidecar
//! auditing in `enforce` mode, the ledger), network namespaces with the sidecars' interception;
//! Jaeger in the root namespace on a link of its own into B. B's sidecar and the ledger export
//! to it over OTLP/HTTP.
//!
//! - One C-STORE (storescu from A) is one trace: `dicom.association` (sidecar, server) →
//!   `dicom.instance` → `ledger.append` (sidecar, client) → `ledger.append` (ledger, server,
//!   its parent remote) → `ledger.commit`, whose leaf index is the entry the ledger holds for
//!   the instance's record id.
//! - One STOW-RS request is one trace: `dicomweb.request` → its `dicom.instance` and the
//!   `ledger.append` that made its record safe, continued in the ledger.
//! - No identifying value of the samples (patient attributes, study, series and instance
//!   UIDs) appears anywhere in what Jaeger holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Lab, link_root, ok, require};
use serde_json::Value;

const PACS: &str = "spiffe://medmesh.local/ns/pacs/sa/orthanc";
const SCANNER: &str = "spiffe://medmesh.local/ns/radiology/sa/scanner";

/// Jaeger's directory from `scripts/jaeger env` (built on first use, cached by version).
fn jaeger_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/jaeger"))
        .arg("env")
        .output()
        .expect("running scripts/jaeger");
    assert!(
        out.status.success(),
        "scripts/jaeger could not build Jaeger from the Go module proxy:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("export MEDMESH_JAEGER_BIN="))
        .expect("scripts/jaeger env prints MEDMESH_JAEGER_BIN");
    let bin = PathBuf::from(dir.trim_matches('\'')).join("jaeger");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// One span as Jaeger returns it (OTLP JSON), with its service.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    kind: String,
    attrs: HashMap<String, String>,
}

/// A trace or span id as hex, whichever encoding the JSON uses (hex, or base64 bytes).
fn hex_id(v: &Value) -> String {
    let s = v.as_str().unwrap_or("");
    if s.chars().all(|c| c.is_ascii_hexdigit()) {
        return s.to_ascii_lowercase();
    }
    use base64::Engine as _;
    hex::encode(
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default(),
    )
}

fn any_value(v: &Value) -> String {
    for k in ["stringValue", "boolValue", "intValue", "doubleValue"] {
        if let Some(x) = v.get(k) {
            return x.as_str().map_or_else(|| x.to_string(), str::to_owned);
        }
    }
    v.to_string()
}

fn spans_of(result: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in result["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .map(|a| any_value(&a["value"]))
            .unwrap_or_default();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                out.push(Span {
                    service: service.clone(),
                    trace: hex_id(&s["traceId"]),
                    id: hex_id(&s["spanId"]),
                    parent: hex_id(&s["parentSpanId"]),
                    name: s["name"].as_str().unwrap_or("").to_owned(),
                    kind: match &s["kind"] {
                        Value::String(k) => k.clone(),
                        Value::Number(n) => format!("{n}"),
                        _ => String::new(),
                    },
                    attrs: s["attributes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|a| {
                            (
                                a["key"].as_str().unwrap_or("").to_owned(),
                                any_value(&a["value"]),
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

/// GET on Jaeger's query API: (status, body).
fn jaeger_get(api: &str, path_and_query: &str) -> (u16, String) {
    let out = mesh::run(Command::new("curl").args([
        "-sS",
        "--max-time",
        "10",
        "-w",
        "\n%{http_code}",
        &format!("http://{api}{path_and_query}"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Every span of `service` Jaeger holds from the last ten minutes (the raw JSON too).
fn traces_of(api: &str, service: &str) -> (Vec<Span>, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rfc3339 = |t: u64| {
        let out = mesh::run(Command::new("date").args(["-u", "-d", &format!("@{t}"), "+%FT%TZ"]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let (status, body) = jaeger_get(
        api,
        &format!(
            "/api/v3/traces?query.service_name={service}&query.start_time_min={}&query.start_time_max={}&query.num_traces=100",
            rfc3339(now - 600),
            rfc3339(now + 60)
        ),
    );
    if status != 200 {
        return (Vec::new(), body);
    }
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    (spans_of(&v["result"]), body)
}

/// The whole trace `id` (every service's spans).
fn trace(api: &str, id: &str) -> (Vec<Span>, String) {
    let (status, body) = jaeger_get(api, &format!("/api/v3/traces/{id}"));
    assert_eq!(status, 200, "trace {id}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    (spans_of(&v["result"]), body)
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "{what}: {found:#?}\nall: {spans:#?}");
    found[0]
}

fn kind_is(s: &Span, k: &str) -> bool {
    // OTLP JSON enum names, or their numbers (SERVER 2, CLIENT 3, INTERNAL 1).
    let n = match k {
        "SERVER" => "2",
        "CLIENT" => "3",
        _ => "1",
    };
    s.kind == format!("SPAN_KIND_{k}") || s.kind == n
}

/// Checks the chain sidecar span `top` → … → ledger commit inside `spans` (one trace), and
/// returns the commit.
fn ledger_chain<'a>(spans: &'a [Span], parent: &Span, what: &str) -> &'a Span {
    let client = one(
        spans,
        &format!("{what}: the sidecar's ledger.append"),
        |s| s.service == "medmesh-sidecar" && s.name == "ledger.append" && s.parent == parent.id,
    );
    assert!(kind_is(client, "CLIENT"), "{client:?}");
    assert_eq!(client.attrs["url.path"], "/v1/entries/batch", "{client:?}");
    assert_eq!(
        client.attrs["http.response.status_code"], "200",
        "{client:?}"
    );
    let server = one(spans, &format!("{what}: the ledger's ledger.append"), |s| {
        s.service == "medmesh-ledger" && s.name == "ledger.append" && s.parent == client.id
    });
    assert!(kind_is(server, "SERVER"), "{server:?}");
    let commit = one(spans, &format!("{what}: ledger.commit"), |s| {
        s.service == "medmesh-ledger" && s.name == "ledger.commit" && s.parent == server.id
    });
    assert!(
        commit.attrs.contains_key("medmesh.leaf_index"),
        "{commit:?}"
    );
    assert!(commit.attrs.contains_key("medmesh.tree_size"), "{commit:?}");
    commit
}

#[test]
fn one_transfer_is_one_trace_from_socket_to_merkle_leaf() {
    require(&[
        "ip",
        "iptables-nft",
        "Orthanc",
        "storescu",
        "curl",
        "setpriv",
        "python3",
    ]);
    let jaeger = jaeger_bin();
    let mut lab = Lab::new("t");
    let sidecar = mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap();
    let (certs, signing) = lab.mesh_files(9);
    let (c, d) = (
        certs.display().to_string(),
        lab.dir.path().display().to_string(),
    );
    lab.write_pacs_policies();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    ok(&format!("ip netns exec {a} {sidecar} init --mode nft"));
    // The collector is outside the mesh (as an OTLP collector Service is): its port is skipped.
    ok(&format!(
        "ip netns exec {b} {sidecar} init --mode nft --skip-outbound-ports 4318"
    ));

    // Jaeger in the root namespace, listening on its side of a link into B only.
    let (root_b, _) = link_root(&b, 2);
    let jaeger_log = std::fs::File::create(lab.path("jaeger.log")).unwrap();
    let _jaeger = mesh::Kill(
        Command::new(&jaeger)
            .env("JAEGER_LISTEN_HOST", &root_b)
            .current_dir(lab.dir.path())
            .stdout(Stdio::from(jaeger_log.try_clone().unwrap()))
            .stderr(Stdio::from(jaeger_log))
            .spawn()
            .expect("jaeger"),
    );
    let api = format!("{root_b}:16686");
    wait_for("Jaeger's query API", Duration::from_secs(60), || {
        (jaeger_get(&api, "/api/v3/services").0 == 200).then_some(())
    });
    let otlp = format!("http://{root_b}:4318");

    lab.start_ledger_with(&certs, &signing, PACS, &["--otlp-endpoint", &otlp]);
    for (ns, who, side) in [(&a, "radiology.scanner", "a"), (&b, "pacs.orthanc", "b")] {
        let mut args: Vec<String> = vec![
            sidecar.into(),
            "run".into(),
            format!("--cert={c}/{who}.pem"),
            format!("--key={c}/{who}-key.pem"),
            format!("--ca={c}/ca.pem"),
            "--trust-domain=medmesh.local".into(),
            format!("--policy={d}/policy-{side}.json"),
        ];
        if side == "b" {
            args.extend([
                "--ledger-url=https://127.0.0.1:18443".into(),
                format!("--ledger-key=@{d}/verifier.key"),
                format!("--audit-key={d}/uid.key"),
                "--audit-delivery=enforce".into(),
                format!("--spool-dir={d}/spool"),
                format!("--otlp-endpoint={otlp}"),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(ns, &format!("sidecar-{side}"), true, &args);
    }
    lab.wait(&a, "curl -sf http://127.0.0.1:15020/ready", "sidecar in A");
    lab.wait(&b, "curl -sf http://127.0.0.1:15020/ready", "sidecar in B");
    lab.start_orthanc("");

    // Two instances from pydicom's samples: one by C-STORE, one by STOW-RS.
    let samples = lab.path("samples");
    std::fs::create_dir_all(&samples).unwrap();
    let manifest = netns::dicom_samples(&samples, 2);
    ok(&format!("chmod -R a+rX {}", samples.display()));
    let dimse = manifest[0]["path"].as_str().unwrap();
    let opt = mesh::storescu_option(manifest[0]["transfer_syntax"].as_str().unwrap()).unwrap_or("");
    let out = lab.exec(
        &a,
        &format!("storescu -aec ORTHANC {opt} {} 4242 {dimse}", lab.ip_b),
    );
    assert!(
        out.status.success() && !mesh::text(&out).contains("Store Failed"),
        "storescu: {}\nsidecar B: {}",
        mesh::text(&out),
        lab.log("sidecar-b")
    );
    let mut body = b"--b\r\nContent-Type: application/dicom\r\n\r\n".to_vec();
    body.extend_from_slice(&std::fs::read(manifest[1]["path"].as_str().unwrap()).unwrap());
    body.extend_from_slice(b"\r\n--b--\r\n");
    let stow_body = lab.path("stow.bin");
    std::fs::write(&stow_body, body).unwrap();
    ok(&format!("chmod a+r {}", stow_body.display()));
    let stow = lab.exec(
        &a,
        &format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' -u test:test \
             -H 'Content-Type: multipart/related; type=\"application/dicom\"; boundary=b' \
             --data-binary @{} http://{}:8042/dicom-web/studies",
            stow_body.display(),
            lab.ip_b
        ),
    );
    assert_eq!(
        String::from_utf8_lossy(&stow.stdout).trim(),
        "200",
        "STOW-RS: {}",
        mesh::text(&stow)
    );

    // The sidecar's batch processor exports within its schedule (5 s by default).
    let (association, instance) = wait_for(
        "the C-STORE's spans in Jaeger",
        Duration::from_secs(60),
        || {
            let (spans, _) = traces_of(&api, "medmesh-sidecar");
            let assoc = spans.iter().find(|s| s.name == "dicom.association")?;
            let inst = spans
                .iter()
                .find(|s| s.name == "dicom.instance" && s.parent == assoc.id)?;
            Some((assoc.clone(), inst.clone()))
        },
    );
    // Both sides of the chain, ledger included, arrive in time.
    let c_store = wait_for(
        "the C-STORE's trace with the ledger's spans",
        Duration::from_secs(60),
        || {
            let (spans, _) = trace(&api, &association.trace);
            spans
                .iter()
                .any(|s| s.name == "ledger.commit")
                .then_some(spans)
        },
    );
    assert!(
        c_store.iter().all(|s| s.trace == association.trace),
        "{c_store:#?}"
    );
    assert!(kind_is(&association, "SERVER"), "{association:?}");
    assert_eq!(association.parent, "", "the association is the root");
    assert_eq!(association.attrs["medmesh.peer"], SCANNER);
    assert_eq!(association.attrs["medmesh.workload"], PACS);
    assert!(
        association.attrs["medmesh.bytes.to_app"]
            .parse::<u64>()
            .unwrap()
            > 1000,
        "{association:?}"
    );
    assert_eq!(instance.attrs["medmesh.event"], "instance_stored");
    assert_eq!(instance.attrs["medmesh.outcome"], "success");
    assert_eq!(instance.attrs["dicom.status"], "0");
    let commit = ledger_chain(&c_store, &instance, "C-STORE");

    // The commit's leaf is the entry the ledger holds for the instance's record.
    let leaf: u64 = commit.attrs["medmesh.leaf_index"].parse().unwrap();
    let auditor = format!(
        "MEDMESH_LEDGER_URL=https://127.0.0.1:18443 MEDMESH_CERT={c}/medmesh.auditor.pem \
         MEDMESH_KEY={c}/medmesh.auditor-key.pem MEDMESH_CA={c}/ca.pem \
         MEDMESH_LEDGER_KEY=@{d}/verifier.key MEDMESH_LEDGER_STATE={d}/auditor.checkpoint"
    );
    let cli = mesh::bin("medmesh");
    // Once a checkpoint covers the leaf.
    let entry_text = wait_for(
        "the commit's entry, proven",
        Duration::from_secs(20),
        || {
            let out = lab.exec(
                &b,
                &format!("env {auditor} {} ledger get {leaf}", cli.display()),
            );
            out.status.success().then(|| mesh::text(&out))
        },
    );
    let record_id = &instance.attrs["medmesh.record_id"];
    assert!(
        entry_text.contains(record_id.as_str()),
        "entry {leaf} does not hold record {record_id}: {entry_text}"
    );

    // The STOW-RS request.
    let request = wait_for(
        "the STOW-RS request's spans in Jaeger",
        Duration::from_secs(60),
        || {
            let (spans, _) = traces_of(&api, "medmesh-sidecar");
            spans
                .into_iter()
                .find(|s| s.name == "dicomweb.request" && s.attrs["medmesh.transaction"] == "stow")
        },
    );
    let stow_spans = wait_for(
        "the STOW-RS trace with the ledger's spans",
        Duration::from_secs(60),
        || {
            let (spans, _) = trace(&api, &request.trace);
            spans
                .iter()
                .any(|s| s.name == "ledger.commit")
                .then_some(spans)
        },
    );
    assert!(kind_is(&request, "SERVER"), "{request:?}");
    assert_eq!(request.attrs["http.request.method"], "POST");
    assert_eq!(request.attrs["http.response.status_code"], "200");
    assert_eq!(request.attrs["medmesh.peer"], SCANNER);
    let part = one(&stow_spans, "the STOW-RS instance", |s| {
        s.name == "dicom.instance" && s.parent == request.id
    });
    assert_eq!(part.attrs["medmesh.event"], "instance_stored");
    ledger_chain(&stow_spans, &request, "STOW-RS");

    // Nothing identifying anywhere Jaeger holds: every span of both services, raw.
    let mut dump = String::new();
    for service in ["medmesh-sidecar", "medmesh-ledger"] {
        let (spans, raw) = traces_of(&api, service);
        assert!(!spans.is_empty(), "no spans of {service}");
        dump.push_str(&raw);
    }
    let values = netns::identifying_values(&manifest, 0);
    for v in &values {
        assert!(
            !dump.contains(v.as_str()),
            "identifying value {v:?} is in a span"
        );
    }
    let checked = values.len();
    assert!(checked >= 6, "only {checked} identifying values checked");
    assert!(
        !dump.contains("/dicom-web/studies"),
        "a DICOMweb path is in a span"
    );
    println!(
        "C-STORE trace {} ({} spans), STOW-RS trace {} ({} spans); {checked} identifying values absent",
        association.trace,
        c_store.len(),
        request.trace,
        stow_spans.len()
    );
}
