//! The sidecar for real: two network-namespace "pods" joined by a veth pair, each with
//! `medmesh-sidecar init` (iptables) and `medmesh-sidecar run` as uid 1337. Unmodified curl ->
//! nginx and DCMTK storescu -> Orthanc work through the mesh, a capture on the wire shows no
//! plaintext, B's sidecar records the stored instance in a ledger (running in pod B) before
//! Orthanc's success reaches storescu, and a policy change denies storescu. Needs root and the
//! peers scripts/check installs; it fails, never skips, when they are missing.

// Integration tests: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/netns.rs"]
mod netns;

use std::time::Duration;

use netns::*;

const POLICY_B: &str = r#"{"inbound": [
  {"port": 8080, "protocol": "http", "allow": [{"service_account": "radiology/scanner"}]},
  {"port": 14242, "protocol": "dicom", "allow": [{"service_account": "radiology/scanner"}]}
]}"#;
const POLICY_B_NO_DICOM: &str = r#"{"inbound": [
  {"port": 8080, "protocol": "http", "allow": [{"service_account": "radiology/scanner"}]}
]}"#;

fn ct_small() -> String {
    let out = sh(
        "python3 -c \"from pydicom.data import get_testdata_file as g; print(g('CT_small.dcm'))\"",
    );
    assert!(
        out.status.success(),
        "pydicom is not installed: scripts/check installs it"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn mesh_between_namespace_pods() {
    require(&[
        "ip",
        "iptables-legacy",
        "iptables-nft",
        "nginx",
        "Orthanc",
        "storescu",
        "tcpdump",
        "setpriv",
        "curl",
    ]);
    let ct = ct_small();
    let mut lab = Lab::new("s");
    let sidecar = mesh::bin("medmesh-sidecar");
    let sidecar = sidecar.to_str().unwrap();

    // Identities, the ledger's signing key, B's UID key and spool, readable by the proxy's uid.
    let (certs, signing) = lab.mesh_files(9);
    let policy_b = lab.path("policy-b.json");
    std::fs::write(&policy_b, POLICY_B).unwrap();
    let policy_a = lab.path("policy-a.json");
    std::fs::write(&policy_a, "{}").unwrap();

    // init: without NET_ADMIN it fails clearly; A with iptables-legacy (twice: idempotent),
    // B with iptables-nft.
    let (a, b) = (lab.a.clone(), lab.b.clone());
    let denied = lab.exec(
        &a,
        &format!("setpriv --reuid 65534 --regid 65534 --clear-groups {sidecar} init --mode legacy"),
    );
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("needs the NET_ADMIN"),
        "{denied:?}"
    );
    ok(&format!("ip netns exec {a} {sidecar} init --mode legacy"));
    let rules = ok(&format!("ip netns exec {a} iptables-legacy -t nat -S"));
    ok(&format!("ip netns exec {a} {sidecar} init --mode legacy"));
    assert_eq!(
        ok(&format!("ip netns exec {a} iptables-legacy -t nat -S")),
        rules,
        "init is not idempotent"
    );
    assert!(
        rules.contains("-A OUTPUT -p tcp -j MEDMESH_OUTPUT"),
        "{rules}"
    );
    ok(&format!("ip netns exec {b} {sidecar} init --mode nft"));
    assert!(
        ok(&format!("ip netns exec {b} iptables-nft -t nat -S"))
            .contains("-A PREROUTING -p tcp -j MEDMESH_INBOUND")
    );

    lab.start_ledger(
        &certs,
        &signing,
        "spiffe://medmesh.local/ns/pacs/sa/orthanc",
    );
    let c = certs.display().to_string();

    // The sidecars, as uid 1337.
    for (ns, who, policy) in [
        (&a, "radiology.scanner", &policy_a),
        (&b, "pacs.orthanc", &policy_b),
    ] {
        let cert = certs.join(format!("{who}.pem"));
        let key = certs.join(format!("{who}-key.pem"));
        let (cert, key, ca, pol) = (
            cert.to_str().unwrap().to_owned(),
            key.to_str().unwrap().to_owned(),
            certs.join("ca.pem").to_str().unwrap().to_owned(),
            policy.to_str().unwrap().to_owned(),
        );
        let name = format!("sidecar-{ns}");
        let mut args: Vec<String> = [
            sidecar,
            "run",
            "--cert",
            &cert,
            "--key",
            &key,
            "--ca",
            &ca,
            "--trust-domain",
            "medmesh.local",
            "--policy",
            &pol,
            "--reload-ms",
            "200",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if ns == &b {
            // B audits its DICOM port; the ledger is on B's loopback (never redirected).
            args.extend([
                "--ledger-url".into(),
                "https://127.0.0.1:18443".into(),
                "--ledger-key".into(),
                format!("@{}", lab.path("verifier.key").display()),
                "--audit-key".into(),
                lab.path("uid.key").display().to_string(),
                "--audit-delivery".into(),
                "enforce".into(),
                "--spool-dir".into(),
                lab.path("spool").display().to_string(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(ns, &name, true, &args);
    }
    lab.wait(&a, "curl -sf http://127.0.0.1:15020/ready", "sidecar in A");
    lab.wait(&b, "curl -sf http://127.0.0.1:15020/ready", "sidecar in B");

    // nginx and Orthanc in B, both unmodified.
    let www = lab.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "medmesh-netns-ok\n").unwrap();
    ok(&format!("chmod -R a+rX {}", www.display()));
    let d = lab.dir.path().display().to_string();
    std::fs::write(
        lab.path("nginx.conf"),
        format!(
            "daemon on; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx.err.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log {d}/nginx.access.log; client_body_temp_path {d}/nt/body; proxy_temp_path {d}/nt/proxy;\n\
             fastcgi_temp_path {d}/nt/fcgi; uwsgi_temp_path {d}/nt/uwsgi; scgi_temp_path {d}/nt/scgi;\n\
             server {{ listen 8080; root {d}/www; }} }}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(lab.path("nt")).unwrap();
    ok(&format!(
        "ip netns exec {b} nginx -p {d} -c {d}/nginx.conf -e {d}/nginx.err.log"
    ));
    lab.track_pid_file(lab.path("nginx.pid"));
    std::fs::write(
        lab.path("orthanc.json"),
        format!(
            r#"{{"Name":"pacs","StorageDirectory":"{d}/orthanc-db","IndexDirectory":"{d}/orthanc-db","HttpPort":18042,
            "DicomPort":14242,"DicomAet":"ORTHANC","RemoteAccessAllowed":false,"AuthenticationEnabled":true,
            "RegisteredUsers":{{"test":"test"}},"DicomAlwaysAllowStore":true,"DicomCheckCalledAet":false}}"#
        ),
    )
    .unwrap();
    let ocfg = lab.path("orthanc.json").to_str().unwrap().to_owned();
    lab.spawn(&b, "orthanc", false, &["Orthanc", &ocfg]);
    lab.wait(
        &b,
        "curl -sf -u test:test http://127.0.0.1:18042/system",
        "Orthanc",
    );

    // Traffic through the mesh, captured on A's veth.
    let ip_b = lab.ip_b.clone();
    let cap = lab.path("wire.pcap");
    let ((page, store), wire) = lab.capture(&cap, |lab| {
        let page = lab.exec(&a, &format!("curl -sS --max-time 10 http://{ip_b}:8080/"));
        let store = lab.exec(&a, &format!("storescu -aec ORTHANC {ip_b} 14242 {ct}"));
        (page, store)
    });
    assert!(
        page.status.success(),
        "curl: {:?}\nA: {}\nB: {}",
        page,
        lab.log(&format!("sidecar-{a}")),
        lab.log(&format!("sidecar-{b}"))
    );
    assert_eq!(String::from_utf8_lossy(&page.stdout), "medmesh-netns-ok\n");
    assert!(
        store.status.success(),
        "storescu: {}{}",
        String::from_utf8_lossy(&store.stdout),
        String::from_utf8_lossy(&store.stderr)
    );
    let instances = ok(&format!(
        "ip netns exec {b} curl -sf -u test:test http://127.0.0.1:18042/instances"
    ));
    assert_eq!(
        instances.matches('"').count() / 2,
        1,
        "Orthanc holds one instance: {instances}"
    );

    // B's sidecar recorded the instance; an auditor in B finds it with a verified proof.
    let auditor_env = format!(
        "MEDMESH_LEDGER_URL=https://127.0.0.1:18443 MEDMESH_CERT={c}/medmesh.auditor.pem MEDMESH_KEY={c}/medmesh.auditor-key.pem \
         MEDMESH_CA={c}/ca.pem MEDMESH_LEDGER_KEY=@{v} MEDMESH_LEDGER_STATE={d}/auditor.checkpoint",
        v = lab.path("verifier.key").display(),
        d = lab.dir.path().display()
    );
    let medmesh = mesh::bin("medmesh");
    let mut found = String::new();
    for _ in 0..50 {
        let out = lab.exec(
            &b,
            &format!("env {auditor_env} {} ledger search --identity spiffe://medmesh.local/ns/radiology/sa/scanner", medmesh.display()),
        );
        found = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if found.contains("instance_stored") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        found.contains("\"kind\":\"instance_stored\"") && found.contains("verified in checkpoint"),
        "{found}\nB sidecar: {}\nledger: {}",
        lab.log(&format!("sidecar-{b}")),
        lab.log("ledger")
    );
    assert!(
        !found.contains("CompressedSamples"),
        "patient data in the ledger: {found}"
    );

    // The wire carried only TLS: no DICOM UIDs, no patient name, no HTTP request or page.
    assert!(
        wire.len() > 20_000,
        "capture too small to mean anything: {} bytes",
        wire.len()
    );
    for plain in [
        &b"1.2.840.10008"[..],
        b"CompressedSamples",
        b"GET / HTTP",
        b"medmesh-netns-ok",
        b"ORTHANC",
    ] {
        assert!(
            !contains(&wire, plain),
            "plaintext {:?} seen on the wire",
            String::from_utf8_lossy(plain)
        );
    }

    // The policy loses its DICOM rule: storescu is now refused, and that is counted.
    std::fs::write(&policy_b, POLICY_B_NO_DICOM).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let store = lab.exec(&a, &format!("storescu -aec ORTHANC {ip_b} 14242 {ct}"));
    assert!(
        !store.status.success(),
        "storescu succeeded against a policy that denies it"
    );
    let page = lab.exec(&a, &format!("curl -sS --max-time 10 http://{ip_b}:8080/"));
    assert!(page.status.success(), "HTTP stays allowed");
    let m = ok(&format!(
        "ip netns exec {b} curl -sf http://127.0.0.1:15020/metrics"
    ));
    assert!(
        m.contains(
            "medmesh_sidecar_authz_decisions_total{decision=\"deny\",kind=\"mtls\",port=\"other\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains("medmesh_sidecar_policy_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    let m = ok(&format!(
        "ip netns exec {a} curl -sf http://127.0.0.1:15020/metrics"
    ));
    assert!(m.contains("medmesh_sidecar_connections_total{direction=\"outbound\",protocol=\"dicom\",tls=\"mtls\"}"), "{m}");
}
