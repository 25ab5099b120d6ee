//! Image-transfer auditing between network-namespace pods, with unmodified peers: pod A (the
//! scanner: DCMTK and curl) and pod B (the PACS: Orthanc with its DICOMweb plugin, the ledger,
//! B's sidecar auditing in `enforce` mode), both with transparent interception.
//!
//! - storescu → Orthanc over DIMSE, 60 instances derived from pydicom's samples: exactly one
//!   success record per instance sent, with the SHA-256 of the data set as sent (DCMTK
//!   storescp in bit-preserving mode is the oracle).
//! - curl STOW-RS → Orthanc, 60 more instances: exactly one record per instance, whose SHA-256
//!   is the file sent and also the bytes WADO-RS returns; each WADO-RS retrieval is recorded.
//! - getscu retrieval is recorded. Every record found is proven with `medmesh ledger prove`,
//!   and no identifying value of any sample is in the ledger, B's sidecar log or its metrics.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;

use std::time::{Duration, Instant};

use medmesh_core::dicom::split_part10;
use medmesh_core::merkle::sha256;
use medmesh_core::record::{EventKind, LogEntry, Outcome, Protocol};
use netns::*;

const SCANNER: &str = "spiffe://medmesh.local/ns/radiology/sa/scanner";
const PACS: &str = "spiffe://medmesh.local/ns/pacs/sa/orthanc";

/// The pods, and how an auditor in B runs the CLI.
struct Pods {
    lab: Lab,
    auditor_env: String,
    /// Every entry the searches printed (for the PHI check).
    seen: std::cell::RefCell<String>,
}

impl Pods {
    fn medmesh_in_b(&self, args: &str) -> String {
        let out = self.lab.exec(
            &self.lab.b,
            &format!(
                "env {} {} ledger {args}",
                self.auditor_env,
                mesh::bin("medmesh").display()
            ),
        );
        assert!(
            out.status.success(),
            "medmesh ledger {args}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Verified search hits: (index, entry).
    fn search(&self, key: &str, value: &str) -> Vec<(u64, LogEntry)> {
        let out = self.medmesh_in_b(&format!("search --{key} {value}"));
        self.seen.borrow_mut().push_str(&out);
        let mut hits = Vec::new();
        let mut lines = out.lines();
        while let Some(l) = lines.next() {
            if let Some(rest) = l.strip_prefix("entry ") {
                assert!(l.contains("verified in checkpoint"), "{l}");
                let index: u64 = rest.split(' ').next().unwrap().parse().unwrap();
                let json = lines.next().unwrap();
                hits.push((index, serde_json::from_str(json).unwrap()));
            }
        }
        hits
    }

    /// Waits until `sha` has `n` records of `kind`; returns them.
    fn records(&self, sha: &str, kind: EventKind, n: usize) -> Vec<(u64, LogEntry)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hits: Vec<_> = self
                .search("sha256", sha)
                .into_iter()
                .filter(|(_, e)| e.record.kind == kind)
                .collect();
            if hits.len() >= n || Instant::now() > deadline {
                return hits;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn setup() -> Pods {
    require(&[
        "ip",
        "iptables-nft",
        "Orthanc",
        "storescu",
        "storescp",
        "getscu",
        "setpriv",
        "curl",
        "python3",
    ]);
    let lab = Lab::new("d");
    let sidecar = mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap();
    let (certs, signing) = lab.mesh_files(5);
    lab.write_pacs_policies();
    let (a, b) = (lab.a.clone(), lab.b.clone());
    ok(&format!("ip netns exec {a} {sidecar} init --mode nft"));
    ok(&format!("ip netns exec {b} {sidecar} init --mode nft"));
    let mut pods = Pods {
        lab,
        auditor_env: String::new(),
        seen: Default::default(),
    };
    let lab = &mut pods.lab;
    let c = certs.display().to_string();
    let d = lab.dir.path().display().to_string();
    lab.start_ledger(&certs, &signing, PACS);
    for (ns, who) in [(&a, "radiology.scanner"), (&b, "pacs.orthanc")] {
        let side = if ns == &a { "a" } else { "b" };
        let mut args: Vec<String> = vec![
            sidecar.into(),
            "run".into(),
            "--cert".into(),
            format!("{c}/{who}.pem"),
            "--key".into(),
            format!("{c}/{who}-key.pem"),
            "--ca".into(),
            format!("{c}/ca.pem"),
            "--trust-domain".into(),
            "medmesh.local".into(),
            "--policy".into(),
            format!("{d}/policy-{side}.json"),
        ];
        if side == "b" {
            args.extend([
                "--ledger-url".into(),
                "https://127.0.0.1:18443".into(),
                "--ledger-key".into(),
                format!("@{d}/verifier.key"),
                "--audit-key".into(),
                format!("{d}/uid.key"),
                "--audit-delivery".into(),
                "enforce".into(),
                "--spool-dir".into(),
                format!("{d}/spool"),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(ns, &format!("sidecar-{side}"), true, &args);
    }
    lab.wait(&a, "curl -sf http://127.0.0.1:15020/ready", "sidecar in A");
    lab.wait(&b, "curl -sf http://127.0.0.1:15020/ready", "sidecar in B");
    let ip_a = lab.ip_a.clone();
    lab.start_orthanc(&format!(
        r#""DicomAlwaysAllowGet":true,
        "DicomModalities":{{"getscu":{{"AET":"GETSCU","Host":"{ip_a}","Port":104,"AllowGet":true}}}},"#
    ));
    pods.auditor_env = format!(
        "MEDMESH_LEDGER_URL=https://127.0.0.1:18443 MEDMESH_CERT={c}/medmesh.auditor.pem \
         MEDMESH_KEY={c}/medmesh.auditor-key.pem MEDMESH_CA={c}/ca.pem \
         MEDMESH_LEDGER_KEY=@{d}/verifier.key MEDMESH_LEDGER_STATE={d}/auditor.checkpoint"
    );
    pods
}

/// The parts of a multipart body (boundary from its content type).
fn parts<'a>(body: &'a [u8], content_type: &str) -> Vec<&'a [u8]> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap()
        .trim_matches('"');
    let delim = format!("\r\n--{boundary}");
    let mut body_with_crlf = Vec::with_capacity(body.len() + 2);
    body_with_crlf.extend_from_slice(b"\r\n");
    body_with_crlf.extend_from_slice(body);
    let hay = &body_with_crlf;
    let mut out = Vec::new();
    let mut starts = Vec::new();
    let mut i = 0;
    while let Some(at) = find(&hay[i..], delim.as_bytes()) {
        starts.push(i + at);
        i += at + delim.len();
    }
    for w in starts.windows(2) {
        let part = &hay[w[0] + delim.len()..w[1]];
        let head_end = find(part, b"\r\n\r\n").unwrap();
        // Offsets into `body` (which is `hay` shifted by the two leading bytes).
        let (s, e) = (w[0] + delim.len() + head_end + 4 - 2, w[1] - 2);
        out.push(&body[s..e]);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn dimse_and_dicomweb_transfers_between_pods_are_recorded() {
    let pods = setup();
    let lab = &pods.lab;
    let (a, b, ip_b) = (lab.a.clone(), lab.b.clone(), lab.ip_b.clone());
    let manifest = dicom_samples(&lab.path("samples"), 120);
    let (dimse, stow) = manifest.split_at(60);

    // --- DIMSE: storescu in A → Orthanc in B, one association per transfer-syntax family,
    // each after the same storescu against a bit-preserving storescp (the bytes as sent).
    let dimse_refs: Vec<&serde_json::Value> = dimse.iter().collect();
    let (as_sent, families) =
        storescu_with_oracle(lab, &dimse_refs, &format!("{ip_b}:4242"), "1", || {
            format!("B: {}", lab.log("sidecar-b"))
        });
    assert!(families >= 5, "too few transfer syntaxes: {families}");
    assert!(as_sent.len() >= 50, "only {} instances sent", as_sent.len());
    let mut proven = Vec::new();
    for m in dimse {
        let uid = m["uids"][2].as_str().unwrap();
        let file = std::fs::read(m["path"].as_str().unwrap()).unwrap();
        let Some(h) = as_sent.get(uid) else {
            // A SOP class storescu does not propose: never sent, so never recorded.
            let in_file = sha256(split_part10(&file).unwrap().unwrap().dataset);
            assert!(
                pods.search("sha256", &in_file.to_hex()).is_empty(),
                "{}",
                m["source"]
            );
            continue;
        };
        let hits = pods.records(&h.to_hex(), EventKind::InstanceStored, 1);
        assert_eq!(hits.len(), 1, "{}: {hits:?}", m["source"]);
        let r = &hits[0].1.record;
        assert_eq!((r.outcome, r.protocol), (Outcome::Success, Protocol::Dimse));
        assert_eq!((r.source.as_str(), r.destination.as_str()), (SCANNER, PACS));
        proven.push(hits[0].0);
    }
    let dimse_recorded = proven.len();

    // --- STOW-RS: curl in A posts the other 60 files, ten per request.
    let boundary = "medmesh-e2e-3c8f0a";
    let mut stow_sha = Vec::new();
    for (i, chunk) in stow.chunks(10).enumerate() {
        let mut body = Vec::new();
        for m in chunk {
            let f = std::fs::read(m["path"].as_str().unwrap()).unwrap();
            stow_sha.push((m, sha256(&f)));
            body.extend_from_slice(
                format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
            );
            body.extend_from_slice(&f);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        let file = lab.path(&format!("stow-{i}.bin"));
        std::fs::write(&file, &body).unwrap();
        let out = lab.exec(
            &a,
            &format!(
                "curl -sS -f -u test:test -H 'Accept: application/dicom+json' \
                 -H 'Content-Type: multipart/related; type=\"application/dicom\"; boundary={boundary}' \
                 --data-binary @{} http://{ip_b}:8042/dicom-web/studies",
                file.display()
            ),
        );
        assert!(
            out.status.success(),
            "STOW-RS {i}: {}\nB: {}",
            mesh::text(&out),
            lab.log("sidecar-b")
        );
        let resp: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            resp["00081198"].get("Value").is_none(),
            "Orthanc refused instances: {resp}"
        );
    }
    for (m, h) in &stow_sha {
        let hits = pods.records(&h.to_hex(), EventKind::InstanceStored, 1);
        assert_eq!(hits.len(), 1, "{}: {hits:?}", m["source"]);
        let r = &hits[0].1.record;
        assert_eq!(
            (r.outcome, r.protocol, r.status),
            (Outcome::Success, Protocol::DicomWeb, Some(200))
        );
        assert_eq!((r.source.as_str(), r.destination.as_str()), (SCANNER, PACS));
        assert!(r.sop_instance_uid.is_some() && r.sop_class_uid.is_some());
        proven.push(hits[0].0);
    }

    // --- WADO-RS: each stored study is retrieved from A in its stored transfer syntax; the
    // bytes returned are the bytes stored (the STOW-RS record's SHA-256), and each retrieval is
    // recorded.
    for (m, h) in &stow_sha {
        let study = m["uids"][0].as_str().unwrap();
        let out_file = lab.path("wado.bin");
        let headers = lab.path("wado.hdr");
        let out = lab.exec(
            &a,
            &format!(
                "curl -sS -f -u test:test -H 'Accept: multipart/related; type=\"application/dicom\"; transfer-syntax=*' \
                 -D {} -o {} http://{ip_b}:8042/dicom-web/studies/{study}",
                headers.display(),
                out_file.display()
            ),
        );
        assert!(out.status.success(), "WADO-RS: {}", mesh::text(&out));
        let hdr = std::fs::read_to_string(&headers).unwrap();
        let ct = hdr
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_owned())
            })
            .unwrap();
        let body = std::fs::read(&out_file).unwrap();
        let got = parts(&body, &ct);
        assert_eq!(got.len(), 1, "{}", m["source"]);
        assert_eq!(
            sha256(got[0]),
            *h,
            "WADO-RS returned other bytes for {}",
            m["source"]
        );
        let hits = pods.records(&h.to_hex(), EventKind::InstanceRetrieved, 1);
        assert_eq!(
            hits.len(),
            1,
            "{}: retrieval not recorded once",
            m["source"]
        );
        let r = &hits[0].1.record;
        assert_eq!((r.source.as_str(), r.destination.as_str()), (PACS, SCANNER));
        proven.push(hits[0].0);
    }

    // --- C-GET of one study with getscu from A is recorded as a retrieval.
    let ct_small = dimse
        .iter()
        .find(|m| {
            m["source"] == "CT_small.dcm" && as_sent.contains_key(m["uids"][2].as_str().unwrap())
        })
        .unwrap();
    let got = lab.path("got");
    std::fs::create_dir_all(&got).unwrap();
    let out = lab.exec(
        &a,
        &format!(
            "getscu -aec ORTHANC {ip_b} 4242 -k QueryRetrieveLevel=STUDY -k StudyInstanceUID={} -od {}",
            ct_small["uids"][0].as_str().unwrap(),
            got.display()
        ),
    );
    assert!(out.status.success(), "getscu: {}", mesh::text(&out));
    let h = as_sent[ct_small["uids"][2].as_str().unwrap()];
    let hits = pods.records(&h.to_hex(), EventKind::InstanceRetrieved, 1);
    assert_eq!(hits.len(), 1, "C-GET retrieval not recorded");
    proven.push(hits[0].0);

    // Every record found is proven by the CLI.
    for i in &proven {
        let out = pods.medmesh_in_b(&format!("prove {i}"));
        assert!(out.contains(": OK"), "{out}");
    }
    let audit = pods.medmesh_in_b("audit --proofs 100000");
    assert!(audit.contains("audit OK"), "{audit}");

    // No identifying value of any sample in the ledger, B's sidecar log or its metrics.
    for who in [SCANNER, PACS] {
        // Hits are capped per query; the per-SHA searches above printed every instance record.
        pods.search("identity", who);
    }
    let mut dump = pods.seen.borrow().clone();
    dump.push_str(&lab.log("sidecar-b"));
    dump.push_str(&ok(&format!(
        "ip netns exec {b} curl -sf http://127.0.0.1:15020/metrics"
    )));
    let values = identifying_values(&manifest, 0);
    for v in &values {
        assert!(!dump.contains(v.as_str()), "identifying value {v:?} leaked");
    }
    let checked = values.len();
    assert!(checked > 100, "only {checked} identifying values checked");
    println!(
        "netns audit: {dimse_recorded} DIMSE stores, {} STOW-RS stores, {} WADO-RS retrievals, 1 C-GET, {} records proven",
        stow_sha.len(),
        stow_sha.len(),
        proven.len()
    );
}
