//! `medmesh demo`: a local mesh on loopback showing the audit trail end to end.
//!
//! Starts a real `medmesh-ledger` (mTLS, redb, signed checkpoints) and two real
//! `medmesh-sidecar`s with certificates from a throw-away CA, a built-in C-STORE receiver (the
//! "PACS") behind the server sidecar, and a built-in C-STORE sender (the "scanner") behind the
//! client sidecar. The sender stores synthetic CT instances that the repo generates itself; the
//! server sidecar records each one in the ledger (`enforce`: the success response waits for the
//! ledger). The demo then verifies every record's inclusion proof, audits the log, alters one
//! stored instance's pixels (the CT-GAN attack) and shows `verify-file` catching it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::dicom::{self, SyntheticInstance};
use medmesh_core::merkle::sha256;
use medmesh_core::record::{EventKind, RecordId};
use medmesh_core::seal::ArchiveKey;
use medmesh_core::tls::{Identity, ServerIdentity, TrustBundle};
use medmesh_core::{NoteSigner, TrustDomain};
use medmesh_ledger_client::{LedgerClient, LedgerClientConfig, TrustedStore};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Working directory (default: a new temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Number of instances.
    #[arg(long, default_value_t = 8)]
    instances: u32,
}

struct LedgerChild(std::process::Child);

impl Drop for LedgerChild {
    fn drop(&mut self) {
        // SIGTERM so the ledger drains and signs its final checkpoint.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(medmesh_core::devnet::free_port()?)
}

fn client(
    ca: &DevCa,
    td: &TrustDomain,
    port: u16,
    who: (&str, &str),
    signer: &NoteSigner,
) -> anyhow::Result<LedgerClient> {
    let issued = ca.issue(&td.workload(who.0, who.1)?, &LeafOptions::default())?;
    Ok(LedgerClient::new(LedgerClientConfig {
        url: format!("https://127.0.0.1:{port}"),
        identity: Identity::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes())?,
        bundle: TrustBundle::from_pem(ca.ca().cert_pem.as_bytes(), td.clone())?,
        server: ServerIdentity::Exact(td.workload("medmesh", "ledger")?),
        verifier: signer.verifier(),
        origin: signer.name().to_owned(),
        timeout: Duration::from_secs(10),
    })?)
}

fn start_ledger(
    dir: &Path,
    ca: &DevCa,
    td: &TrustDomain,
    signer: &NoteSigner,
) -> anyhow::Result<(LedgerChild, u16)> {
    let ledger = ca.issue(&td.workload("medmesh", "ledger")?, &LeafOptions::default())?;
    let w = |name: &str, data: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, data)?;
        Ok(p)
    };
    let (cert, key) = (
        w("ledger.pem", &ledger.cert_pem)?,
        w("ledger-key.pem", &ledger.key_pem)?,
    );
    let (ca_path, sk) = (
        w("ca.pem", &ca.ca().cert_pem)?,
        w("signing.key", &signer.private_key())?,
    );
    let (port, admin) = (free_port()?, free_port()?);
    let cfg = w(
        "ledger.yaml",
        &format!(
            "node_id: demo\norigin: {origin}\ndata_dir: {data}\nlisten: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n\
             trust_domain: {td}\ncert: {cert}\nkey: {key}\ntrust_bundle: {ca}\nsigning_key: {sk}\n\
             appenders: [\"spiffe://{td}/ns/pacs/sa/orthanc\"]\nreaders: [\"spiffe://{td}/ns/medmesh/sa/auditor\"]\n\
             checkpoint_interval_ms: 200\n",
            origin = signer.name(),
            data = dir.join("ledger-data").display(),
            cert = cert.display(),
            key = key.display(),
            ca = ca_path.display(),
            sk = sk.display(),
        ),
    )?;
    let exe = std::env::current_exe()?
        .parent()
        .context("executable has no directory")?
        .join("medmesh-ledger");
    let child = Command::new(&exe)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| {
            format!(
                "start {} (build it with `cargo build --workspace --bins`)",
                exe.display()
            )
        })?;
    let child = LedgerChild(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "ledger did not start within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, port))
}

/// Starts a sidecar process; returns it and its (inbound, outbound, admin) ports.
fn start_sidecar(
    dir: &Path,
    name: &str,
    args: &[String],
) -> anyhow::Result<(LedgerChild, [u16; 3])> {
    let ports = [free_port()?, free_port()?, free_port()?];
    let exe = std::env::current_exe()?
        .parent()
        .context("executable has no directory")?
        .join("medmesh-sidecar");
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(&exe)
        .arg("run")
        .args(args)
        .args(["--inbound-addr", &format!("127.0.0.1:{}", ports[0])])
        .args(["--outbound-addr", &format!("127.0.0.1:{}", ports[1])])
        .args(["--admin-addr", &format!("127.0.0.1:{}", ports[2])])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "start {} (build it with `cargo build --workspace --bins`)",
                exe.display()
            )
        })?;
    let child = LedgerChild(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = std::net::TcpStream::connect(("127.0.0.1", ports[2]))
            .ok()
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
                let mut b = String::new();
                s.read_to_string(&mut b).ok()?;
                Some(b.starts_with("HTTP/1.1 200") || b.starts_with("HTTP/1.0 200"))
            });
        if ready == Some(true) {
            return Ok((child, ports));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name} did not become ready within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal C-STORE SCP (the demo's "PACS"): stores each received data set as a Part 10 file
/// and answers success.
fn receiver(storage: PathBuf) -> anyhow::Result<u16> {
    use dicom_ul::association::server::ServerAssociationOptions;
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    use medmesh_core::dicom::command::{self, Command};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let storage = storage.clone();
            std::thread::spawn(move || {
                let opts = ServerAssociationOptions::new()
                    .accept_any()
                    .ae_title("ORTHANC")
                    .with_abstract_syntax(dicom::CT_IMAGE_STORAGE)
                    .with_transfer_syntax(dicom::EXPLICIT_VR_LE);
                let Ok(mut assoc) = opts.establish(stream) else {
                    return;
                };
                let (mut cmd, mut data) = (Vec::new(), Vec::new());
                while let Ok(pdu) = assoc.receive() {
                    match pdu {
                        Pdu::PData { data: values } => {
                            for v in values {
                                let ctx = v.presentation_context_id;
                                match v.value_type {
                                    PDataValueType::Command => cmd.extend_from_slice(&v.data),
                                    PDataValueType::Data => data.extend_from_slice(&v.data),
                                }
                                if v.value_type == PDataValueType::Data && v.is_last {
                                    let Ok(rq) = command::parse(&cmd) else { return };
                                    let instance = rq.sop_instance.clone().unwrap_or_default();
                                    let file = dicom::part10(
                                        dicom::CT_IMAGE_STORAGE,
                                        &instance,
                                        dicom::EXPLICIT_VR_LE,
                                        &data,
                                    );
                                    let _ = std::fs::write(
                                        storage.join(format!("{instance}.dcm")),
                                        file,
                                    );
                                    let rsp = command::encode(&Command {
                                        field: command::C_STORE_RSP,
                                        responded_to: rq.message_id,
                                        sop_class: rq.sop_class,
                                        sop_instance: rq.sop_instance,
                                        status: Some(0),
                                        has_dataset: false,
                                        message_id: None,
                                    });
                                    let out = Pdu::PData {
                                        data: vec![PDataValue {
                                            presentation_context_id: ctx,
                                            value_type: PDataValueType::Command,
                                            is_last: true,
                                            data: rsp,
                                        }],
                                    };
                                    if assoc.send(&out).is_err() {
                                        return;
                                    }
                                    cmd.clear();
                                    data.clear();
                                }
                            }
                        }
                        Pdu::ReleaseRQ => {
                            let _ = assoc.send(&Pdu::ReleaseRP);
                            return;
                        }
                        _ => return,
                    }
                }
            });
        }
    });
    Ok(port)
}

/// The demo's "scanner": stores `files` (Part 10) in one association; returns each status.
fn sender(addr: String, files: Vec<Vec<u8>>) -> anyhow::Result<Vec<u16>> {
    let items = files
        .iter()
        .map(|f| crate::dimse::StoreItem::from_part10(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    crate::dimse::store(&addr, "CTSCANNER", "ORTHANC", &items)
        .context("association through the client sidecar")
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let td = TrustDomain::new("medmesh.local")?;
    let ca = DevCa::new(&td, 1)?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let signer = NoteSigner::from_seed("medmesh.local/demo-ledger", seed)?;
    println!(
        "== ledger: medmesh-ledger on loopback (mTLS, redb in {})",
        dir.display()
    );
    let (_ledger, ledger_port) = start_ledger(&dir, &ca, &td, &signer)?;
    println!("   checkpoint key {}", signer.verifier_key());
    std::fs::write(dir.join("verifier.key"), signer.verifier_key())?;

    // Workload identities and the PACS tenant's UID key.
    let issue = |name: &str, ns: &str, sa: &str| -> anyhow::Result<(PathBuf, PathBuf)> {
        let i = ca.issue(&td.workload(ns, sa)?, &LeafOptions::default())?;
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, i.cert_pem)?;
        std::fs::write(&k, i.key_pem)?;
        Ok((c, k))
    };
    let (pacs_cert, pacs_key) = issue("pacs", "pacs", "orthanc")?;
    let (ct_cert, ct_key) = issue("scanner", "radiology", "ct-scanner")?;
    let mut tenant_key = vec![0u8; 32];
    getrandom::fill(&mut tenant_key).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    std::fs::write(dir.join("uid.key"), &tenant_key)?;
    // The PACS namespace's archive key: sidecars seal to its recipient; only restorers hold it.
    let archive_key = ArchiveKey::generate();
    std::fs::write(dir.join("archive.key"), archive_key.to_secret_string())?;
    let archive_store = dir.join("archive-store");

    // The PACS and its sidecar, which audits the DICOM port in enforce mode.
    let storage = dir.join("pacs-storage");
    std::fs::create_dir_all(&storage)?;
    let pacs_port = receiver(storage.clone())?;
    std::fs::write(
        dir.join("pacs-policy.json"),
        format!(
            r#"{{"inbound":[{{"port":{pacs_port},"protocol":"dicom","allow":[{{"service_account":"radiology/ct-scanner"}}]}}]}}"#
        ),
    )?;
    let p = |x: &Path| x.display().to_string();
    let common = |cert: &Path, key: &Path| {
        vec![
            "--trust-domain".to_owned(),
            "medmesh.local".to_owned(),
            "--cert".to_owned(),
            p(cert),
            "--key".to_owned(),
            p(key),
            "--ca".to_owned(),
            p(&dir.join("ca.pem")),
        ]
    };
    let mut server_args = common(&pacs_cert, &pacs_key);
    server_args.extend([
        "--policy".into(),
        p(&dir.join("pacs-policy.json")),
        "--dev-inbound-port".into(),
        pacs_port.to_string(),
        "--ledger-url".into(),
        format!("https://127.0.0.1:{ledger_port}"),
        "--ledger-key".into(),
        format!("@{}", p(&dir.join("verifier.key"))),
        "--audit-key".into(),
        p(&dir.join("uid.key")),
        "--audit-delivery".into(),
        "enforce".into(),
        "--spool-dir".into(),
        p(&dir.join("pacs-spool")),
        "--archive-store".into(),
        p(&archive_store),
        "--archive-recipients".into(),
        archive_key.recipient().to_string(),
    ]);
    let (_server, server_ports) = start_sidecar(&dir, "pacs-sidecar", &server_args)?;
    let mut client_args = common(&ct_cert, &ct_key);
    client_args.extend([
        "--dev-outbound-dst".into(),
        format!("127.0.0.1:{}", server_ports[0]),
    ]);
    let (_client, client_ports) = start_sidecar(&dir, "scanner-sidecar", &client_args)?;
    println!(
        "== mesh: scanner sidecar (spiffe://medmesh.local/ns/radiology/sa/ct-scanner) -> mTLS -> PACS sidecar (spiffe://medmesh.local/ns/pacs/sa/orthanc, auditing DICOM, enforce; archiving each instance sealed with age into the local object store {}, CIDs as Kubo computes them)",
        archive_store.display()
    );

    // The scanner sends synthetic CT instances through its sidecar.
    let study = format!("2.25.{}", u128::from_be_bytes(RecordId::random()?.0) >> 8);
    let mut files = Vec::new();
    for n in 0..args.instances {
        files.push(dicom::synthetic_ct(&SyntheticInstance {
            study_uid: study.clone(),
            series_uid: format!("{study}.1"),
            sop_instance_uid: format!("{study}.1.{}", n + 1),
            patient_name: "DEMO^SYNTHETIC".into(),
            patient_id: "DEMO-0001".into(),
            rows: 128,
            columns: 128,
            seed: u64::from(n) + 1,
        }));
    }
    let hashes: Vec<_> = files
        .iter()
        .map(|f| dicom::split_part10(f).map(|p| p.map(|p| sha256(p.dataset))))
        .collect::<Result<Option<Vec<_>>, _>>()?
        .context("synthetic files are Part 10")?;
    let addr = format!("127.0.0.1:{}", client_ports[1]);
    println!(
        "== transfers: {} synthetic CT instances, C-STORE scanner -> PACS through the mesh",
        files.len()
    );
    let statuses = tokio::task::spawn_blocking(move || sender(addr, files)).await??;
    let transfers = statuses.iter().filter(|s| **s == 0).count();
    println!(
        "   {transfers} of {} stores answered success",
        statuses.len()
    );

    println!(
        "== auditor: trust the latest checkpoint, verify each instance's record, audit the log"
    );
    let auditor = client(&ca, &td, ledger_port, ("medmesh", "auditor"), &signer)?;
    let store = TrustedStore::new(dir.join("auditor.checkpoint"));
    auditor.update_trusted(&store).await?;
    let (mut recorded, mut verified) = (0, 0);
    for h in &hashes {
        // A record is searchable once a signed checkpoint covers it (at most one checkpoint
        // interval after its acknowledgement): ask again until then, up to a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (cp, hits) = loop {
            // The client checks each hit's inclusion proof and that it carries this hash.
            let (cp, hits, _) = auditor.search("sha256", &h.to_hex()).await?;
            if !hits.is_empty() || Instant::now() >= deadline {
                break (cp, hits);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if let Some(hit) = hits.first() {
            recorded += 1;
            verified += 1;
            println!(
                "   entry {} sha256={h} {} {} -> {} status={:?}: inclusion proof ({} hashes) verified in checkpoint size={}",
                hit.index,
                hit.entry.record.kind,
                hit.entry.record.source,
                hit.entry.record.destination,
                hit.entry.record.status,
                hit.proof.len(),
                cp.checkpoint.size
            );
            println!(
                "      record: {}",
                serde_json::to_string(&hit.entry.record)?
            );
        } else {
            println!("   NOT RECORDED: sha256={h}");
        }
    }
    let cp = auditor.update_trusted(&store).await?.new.checkpoint;
    let report = auditor.audit(&cp, 1000).await?;
    anyhow::ensure!(report.ok(), "audit failed: {:?}", report.problems);
    println!(
        "   audit OK: {} entries rebuilt to root {} = signed checkpoint size={}, {} inclusion proofs checked",
        report.entries, report.rebuilt_root, cp.size, report.proofs_checked
    );

    // Each stored instance is archived in the background; its `instance_archived` record
    // follows once the object is in the store.
    let deadline = Instant::now() + Duration::from_secs(15);
    let archived = loop {
        let mut n = 0;
        for h in &hashes {
            let (_, hits, _) = auditor.search("sha256", &h.to_hex()).await?;
            n += usize::from(
                hits.iter()
                    .any(|x| x.entry.record.kind == EventKind::InstanceArchived),
            );
        }
        if n == hashes.len() || Instant::now() >= deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "== archive: {archived} of {} instances archived encrypted (instance_archived records in the ledger, objects in {})",
        hashes.len(),
        archive_store.display()
    );
    let cp = auditor.update_trusted(&store).await?.new.checkpoint;

    let mut stored: Vec<PathBuf> = std::fs::read_dir(&storage)?
        .flatten()
        .map(|e| e.path())
        .collect();
    stored.sort();
    anyhow::ensure!(
        stored.len() >= 2,
        "the PACS stored {} instances",
        stored.len()
    );
    println!(
        "== attack: alter pixel data of {} in the PACS, as CT-GAN would",
        stored[0].display()
    );
    let mut bytes = std::fs::read(&stored[0])?;
    let len = bytes.len();
    for b in &mut bytes[len - 2000..len - 1000] {
        *b = b.wrapping_add(7);
    }
    std::fs::write(&stored[0], &bytes)?;
    let uid_key = dir.join("uid.key");
    println!(
        "   $ medmesh ledger verify-file --uid-key {} {}",
        uid_key.display(),
        stored[0].display()
    );
    let tampered =
        crate::ledger::verify_file(&auditor, &cp, &stored[0], Some(&uid_key)).await? == 0;
    println!("   $ medmesh ledger verify-file {}", stored[1].display());
    let intact = crate::ledger::verify_file(&auditor, &cp, &stored[1], None).await? > 0;
    anyhow::ensure!(intact, "an unaltered instance did not verify");

    let original = dir.join("recovered.dcm");
    println!(
        "== recovery: the original from the archive, verified against the ledger\n   $ medmesh archive get {} --uid-key {} --identity {} --store {} --out {}",
        stored[0].display(),
        uid_key.display(),
        dir.join("archive.key").display(),
        archive_store.display(),
        original.display()
    );
    let src = medmesh_archive::Source::Store(medmesh_archive::LocalStore::open(&archive_store)?);
    let recovered = async {
        let e = crate::archive::find_archived(
            &auditor,
            &cp,
            &stored[0].display().to_string(),
            Some(&uid_key),
        )
        .await?;
        let rec = crate::archive::recover(&e, &src, &dir.join("archive.key"), &original).await?;
        crate::archive::write_out(&e, &rec, &original, false)?;
        anyhow::Ok(())
    }
    .await;
    let recovered = match recovered {
        Ok(()) => {
            println!("   $ medmesh ledger verify-file {}", original.display());
            crate::ledger::verify_file(&auditor, &cp, &original, None).await? > 0
        }
        Err(e) => {
            println!("   NOT RECOVERED: {e:#}");
            false
        }
    };
    println!("== done in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "demo transfers={transfers} recorded={recorded} verified={verified} tamper_detected={tampered} archived={archived} recovered={recovered}"
    );
    Ok(())
}
