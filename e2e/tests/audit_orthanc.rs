//! DICOM auditing with Orthanc, the real ledger and at least 50 instances derived from pydicom's
//! sample files (10 transfer syntaxes): unmodified DCMTK storescu and getscu go through two
//! sidecars; every stored instance yields exactly one verified record whose SHA-256 is the data
//! set sent, retrievals are recorded, and no identifying value of any sample reaches the ledger,
//! the sidecar's log or its metrics.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medmesh_core::dicom::split_part10;
use medmesh_core::merkle::sha256;
use medmesh_core::record::{EventKind, Outcome};
use mesh::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orthanc_with_pydicom_samples() {
    for t in ["storescu", "getscu", "Orthanc", "python3"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .status()
                .unwrap()
                .success(),
            "{t} is not installed: scripts/check installs the e2e peers"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ledger = LedgerProc::setup(d);
    ledger.start().unwrap();
    let certs = d.join("certs");
    let out = run(Command::new(bin("medmesh"))
        .args(["dev", "certs", "--workload", "radiology/scanner", "--out"])
        .arg(&certs));
    assert!(out.status.success(), "{}", text(&out));

    // Sample instances and their identifying values.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dicom_samples.py");
    let out =
        run(Command::new("python3").args([script, d.join("samples").to_str().unwrap(), "60"]));
    assert!(out.status.success(), "pydicom samples: {}", text(&out));
    let manifest: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(manifest.len() >= 50);

    // Orthanc behind the server sidecar.
    let (dicom_port, http_port) = (free_port(), free_port());
    let db = d.join("orthanc-db");
    std::fs::write(
        d.join("orthanc.json"),
        format!(
            r#"{{"Name":"pacs","StorageDirectory":"{db}","IndexDirectory":"{db}","HttpPort":{http_port},"DicomPort":{dicom_port},
            "DicomAet":"ORTHANC","RemoteAccessAllowed":false,"AuthenticationEnabled":true,"RegisteredUsers":{{"test":"test"}},
            "DicomAlwaysAllowStore":true,"DicomAlwaysAllowGet":true,"DicomCheckCalledAet":false,
            "DicomModalities":{{"getscu":{{"AET":"GETSCU","Host":"127.0.0.1","Port":104,"AllowGet":true}}}}}}"#,
            db = db.display()
        ),
    )
    .unwrap();
    let _orthanc = Kill(
        Command::new("Orthanc")
            .arg(d.join("orthanc.json"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("orthanc.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", dicom_port)).is_err() {
        assert!(Instant::now() < deadline, "Orthanc did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let policy = d.join("policy.json");
    std::fs::write(
        &policy,
        format!(r#"{{"inbound":[{{"port":{dicom_port},"protocol":"dicom","allow":[{{"service_account":"radiology/scanner"}}]}}]}}"#),
    )
    .unwrap();
    std::fs::write(d.join("uid.key"), [3u8; 32]).unwrap();
    let server_args = audit_server_args(d, &ledger, &policy, dicom_port, "enforce");
    let (_server, sp) = sidecar(d, "server-sidecar", &server_args);
    let client_args = scanner_client_args(d, sp[0]);
    let (_client, cp) = sidecar(d, "client-sidecar", &client_args);

    // storescu proposes one transfer-syntax family per run: one association per family.
    let paths: Vec<String> = manifest
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_owned())
        .collect();
    let option = |ts: &str| match ts {
        "1.2.840.10008.1.2.4.50" => Some("-xy"),
        "1.2.840.10008.1.2.4.51" => Some("-xx"),
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => Some("-xs"),
        "1.2.840.10008.1.2.4.80" => Some("-xt"),
        "1.2.840.10008.1.2.4.81" => Some("-xu"),
        "1.2.840.10008.1.2.4.90" => Some("-xv"),
        "1.2.840.10008.1.2.4.91" => Some("-xw"),
        "1.2.840.10008.1.2.5" => Some("-xr"),
        // Uncompressed: propose the file's own syntax, so that both receivers accept the same
        // one and storescu sends the same bytes to each.
        "1.2.840.10008.1.2" => Some("-xi"),
        _ => Some("-xe"),
    };
    let mut groups: std::collections::BTreeMap<Option<&str>, Vec<&str>> = Default::default(); // by storescu option
    for (m, p) in manifest.iter().zip(&paths) {
        groups
            .entry(option(m["transfer_syntax"].as_str().unwrap()))
            .or_default()
            .push(p);
    }
    assert!(
        groups.len() >= 5,
        "too few transfer syntaxes: {:?}",
        groups.keys()
    );

    // The oracle of "the bytes as sent": the same storescu runs against DCMTK storescp in
    // bit-preserving mode, which writes each received data set exactly as it arrived.
    let oracle_dir = d.join("oracle");
    std::fs::create_dir_all(&oracle_dir).unwrap();
    let oracle_port = free_port();
    let oracle = Kill(
        Command::new("storescp")
            .args(["+B", "+xa", "-aet", "ORACLE", "-od"])
            .arg(&oracle_dir)
            .arg(oracle_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", oracle_port)).is_err() {
        assert!(Instant::now() < deadline, "storescp did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (opt, files) in &groups {
        let mut cmd = Command::new("storescu");
        cmd.args([
            "-nh",
            "-aec",
            "ORACLE",
            "127.0.0.1",
            &oracle_port.to_string(),
        ]);
        if let Some(o) = opt {
            cmd.arg(o);
        }
        let out = run(cmd.args(files));
        assert!(
            out.status.success(),
            "storescu to the oracle: {}",
            text(&out)
        );
    }
    drop(oracle);
    // storescp names files <modality>.<SOP Instance UID>.
    let mut as_sent = std::collections::HashMap::new();
    for e in std::fs::read_dir(&oracle_dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let uid = name.split_once('.').map(|(_, u)| u.to_owned()).unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        as_sent.insert(uid, sha256(split_part10(&bytes).unwrap().unwrap().dataset));
    }
    assert!(
        as_sent.len() >= 50,
        "the oracle received {} instances",
        as_sent.len()
    );

    for (opt, files) in &groups {
        let mut cmd = Command::new("storescu");
        cmd.args(["-nh", "-aec", "ORTHANC", "127.0.0.1", &cp[1].to_string()]);
        if let Some(o) = opt {
            cmd.arg(o);
        }
        let out = run(cmd.args(files));
        assert!(
            out.status.success() && !text(&out).contains("Store Failed"),
            "storescu {opt:?}: {}",
            text(&out)
        );
    }
    let stored = run(Command::new("curl").args([
        "-sf",
        "-u",
        "test:test",
        &format!("http://127.0.0.1:{http_port}/instances?expand"),
    ]));
    let expanded: Vec<serde_json::Value> = serde_json::from_slice(&stored.stdout).unwrap();
    let held: std::collections::HashSet<&str> = expanded
        .iter()
        .filter_map(|i| i["MainDicomTags"]["SOPInstanceUID"].as_str())
        .collect();
    // storescu skips SOP classes it does not propose by default (e.g. segmentations): those
    // instances were never transferred, so they must have no record.
    assert!(
        held.len() >= 50,
        "only {} instances reached Orthanc",
        held.len()
    );

    // Exactly one verified success record per instance, with the SHA-256 of the data set sent.
    let auditor = ledger.client("audit.auditor");
    let mut differs_from_file = 0;
    for (m, path) in manifest.iter().zip(&paths) {
        let uid = m["uids"][2].as_str().unwrap();
        let file = std::fs::read(path).unwrap();
        let in_file = sha256(split_part10(&file).unwrap().unwrap().dataset);
        let Some(&h) = as_sent.get(uid) else {
            // Never sent (a SOP class storescu does not propose): no record may exist.
            let (_, hits, _) = auditor.search("sha256", &in_file.to_hex()).await.unwrap();
            assert!(
                hits.is_empty() && !held.contains(uid),
                "{} was never sent but is recorded",
                m["source"]
            );
            continue;
        };
        if h != in_file {
            // DCMTK re-encoded this file when sending it: the record must hold what was sent.
            differs_from_file += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let hits = loop {
            let (_, hits, _) = auditor.search("sha256", &h.to_hex()).await.unwrap();
            if !hits.is_empty() || Instant::now() > deadline {
                break hits;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(
            held.contains(uid),
            "{} was sent to the oracle but Orthanc does not hold it",
            m["source"]
        );
        assert_eq!(hits.len(), 1, "{}: {} records", m["source"], hits.len());
        let r = &hits[0].entry.record;
        assert_eq!(
            (r.kind, r.outcome),
            (EventKind::InstanceStored, Outcome::Success),
            "{}",
            m["source"]
        );
        assert_eq!(
            r.transfer_syntax_uid.as_ref().map(|t| t.to_string()),
            m["transfer_syntax"].as_str().map(str::to_owned)
        );
        assert!(
            r.study_uid.is_some() && r.series_uid.is_some() && r.sop_instance_uid.is_some(),
            "{}",
            m["source"]
        );
    }

    println!(
        "{differs_from_file} instances were re-encoded by storescu; their records hold the bytes sent"
    );

    // Retrieval of one study with C-GET through the mesh is recorded as retrievals.
    // A study getscu can receive with its default (uncompressed) presentation contexts.
    let study = manifest
        .iter()
        .find(|m| m["source"] == "CT_small.dcm")
        .map(|m| m["uids"][0].as_str().unwrap())
        .unwrap();
    let got = d.join("got");
    std::fs::create_dir_all(&got).unwrap();
    let out = run(Command::new("getscu")
        .args([
            "-aec",
            "ORTHANC",
            "127.0.0.1",
            &cp[1].to_string(),
            "-k",
            "QueryRetrieveLevel=STUDY",
        ])
        .args(["-k", &format!("StudyInstanceUID={study}"), "-od"])
        .arg(&got));
    assert!(out.status.success(), "getscu: {}", text(&out));
    assert_eq!(std::fs::read_dir(&got).unwrap().count(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, hits, _) = auditor
            .search("identity", "spiffe://medmesh.local/ns/radiology/sa/scanner")
            .await
            .unwrap();
        let kinds: Vec<EventKind> = hits.iter().map(|h| h.entry.record.kind).collect();
        if kinds.contains(&EventKind::InstanceRetrieved)
            && kinds.contains(&EventKind::QueryPerformed)
        {
            let r = hits
                .iter()
                .find(|h| h.entry.record.kind == EventKind::InstanceRetrieved)
                .unwrap();
            assert_eq!(
                r.entry.record.source.as_str(),
                "spiffe://medmesh.local/ns/pacs/sa/writer",
                "retrievals flow from the PACS"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retrieval not recorded: {kinds:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // No identifying value of any sample in the ledger, the sidecar's log or its metrics.
    let mut dump = String::new();
    let size = auditor.checkpoint().await.unwrap().checkpoint.size;
    let mut start = 0;
    while start < size {
        let page = auditor
            .entries(start, (start + 1000).min(size))
            .await
            .unwrap();
        dump.push_str(&serde_json::to_string(&page.entries).unwrap());
        start += 1000;
    }
    dump.push_str(&std::fs::read_to_string(d.join("server-sidecar.log")).unwrap());
    dump.push_str(&String::from_utf8_lossy(
        &run(Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{}/metrics", sp[2])]))
            .stdout,
    ));
    let mut checked = 0;
    for m in &manifest {
        for v in m["phi"]
            .as_array()
            .unwrap()
            .iter()
            .chain(m["uids"].as_array().unwrap())
        {
            let v = v.as_str().unwrap();
            // Values made only of hex digits could occur by chance inside hashes.
            if v.chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == ' ')
            {
                continue;
            }
            checked += 1;
            assert!(
                !dump.contains(v),
                "identifying value {v:?} of {} leaked",
                m["source"]
            );
        }
    }
    assert!(checked > 50, "only {checked} identifying values checked");
}
