//! `medmesh demo`: a local mesh on loopback showing the audit trail end to end.
//!
//! Starts a real `medmesh-ledger` (mTLS, redb, signed checkpoints) with certificates from a
//! throw-away CA, writes synthetic CT instances that the repo generates itself, records each one
//! the way the receiving sidecar does (data-set SHA-256, keyed UID hashes, both identities),
//! verifies every record's inclusion proof, audits the log, then alters one stored instance's
//! pixels (the CT-GAN attack) and shows `verify-file` catching it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::dicom::{self, SyntheticInstance};
use medmesh_core::merkle::sha256;
use medmesh_core::record::{AuditRecord, EventKind, Outcome, Protocol, RecordId, UidKey};
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
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
        "== ledger: starting medmesh-ledger on loopback (mTLS, redb in {})",
        dir.display()
    );
    let (_ledger, port) = start_ledger(&dir, &ca, &td, &signer)?;
    println!("   checkpoint key {}", signer.verifier_key());

    // The receiving side: a PACS whose sidecar (spiffe://…/ns/pacs/sa/orthanc) records transfers.
    let pacs = client(&ca, &td, port, ("pacs", "orthanc"), &signer)?;
    let auditor = client(&ca, &td, port, ("medmesh", "auditor"), &signer)?;
    let scanner = td.workload("radiology", "ct-scanner")?;
    let orthanc = td.workload("pacs", "orthanc")?;
    let mut tenant_key = vec![0u8; 32];
    getrandom::fill(&mut tenant_key).map_err(|e| anyhow::anyhow!("random: {e}"))?;
    let uid_key = UidKey::new(tenant_key)?;
    let storage = dir.join("pacs-storage");
    std::fs::create_dir_all(&storage)?;

    println!(
        "== transfers: {} synthetic CT instances, scanner -> PACS (sidecars are not built yet: records \
         are submitted as the receiving sidecar will submit them)",
        args.instances
    );
    let study = format!("2.25.{}", u128::from_be_bytes(RecordId::random()?.0) >> 8);
    let mut files = Vec::new();
    let (mut recorded, mut verified) = (0u32, 0u32);
    for n in 0..args.instances {
        let inst = SyntheticInstance {
            study_uid: study.clone(),
            series_uid: format!("{study}.1"),
            sop_instance_uid: format!("{study}.1.{}", n + 1),
            patient_name: "DEMO^SYNTHETIC".into(),
            patient_id: "DEMO-0001".into(),
            rows: 128,
            columns: 128,
            seed: u64::from(n) + 1,
        };
        let file = dicom::synthetic_ct(&inst);
        let p10 = dicom::split_part10(&file)?.context("synthetic file is Part 10")?;
        let path = storage.join(format!("ct-{:03}.dcm", n + 1));
        std::fs::write(&path, &file)?;
        let record = AuditRecord {
            record_id: RecordId::new()?,
            kind: EventKind::InstanceStored,
            time_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_micros() as u64,
            source: scanner.clone(),
            destination: orthanc.clone(),
            protocol: Protocol::Dimse,
            outcome: Outcome::Success,
            status: Some(0),
            bytes: p10.dataset.len() as u64,
            content_sha256: Some(sha256(p10.dataset)),
            study_uid: Some(uid_key.hash_uid(&inst.study_uid)),
            series_uid: Some(uid_key.hash_uid(&inst.series_uid)),
            sop_instance_uid: Some(uid_key.hash_uid(&inst.sop_instance_uid)),
            calling_ae: Some(uid_key.hash_ae_title("CTSCANNER")),
            called_ae: Some(uid_key.hash_ae_title("ORTHANC")),
            sop_class_uid: Some(dicom::CT_IMAGE_STORAGE.parse()?),
            transfer_syntax_uid: Some(dicom::EXPLICIT_VR_LE.parse()?),
            cid: None,
        };
        // The client verifies the returned proof against the returned checkpoint.
        let resp = pacs.append(&record, true).await?;
        recorded += 1;
        let proof_len = resp.result.inclusion_proof.as_ref().map_or(0, Vec::len);
        let cp = resp.checkpoint.as_deref().unwrap_or_default();
        let size = cp.lines().nth(1).unwrap_or("?");
        println!(
            "   {} -> entry {} leaf={} sha256={} proof: {} hashes, verified in checkpoint size={size}",
            path.file_name().and_then(|f| f.to_str()).unwrap_or("?"),
            resp.result.index,
            resp.result.leaf_hash,
            sha256(p10.dataset),
            proof_len
        );
        println!("      record: {}", serde_json::to_string(&record)?);
        verified += 1;
        files.push(path);
    }

    println!("== auditor: trust the latest checkpoint, audit the whole log");
    let store = TrustedStore::new(dir.join("auditor.checkpoint"));
    let cp = loop {
        let u = auditor.update_trusted(&store).await?;
        if u.new.checkpoint.size >= u64::from(recorded) {
            break u.new.checkpoint;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let report = auditor.audit(&cp, 1000).await?;
    anyhow::ensure!(report.ok(), "audit failed: {:?}", report.problems);
    println!(
        "   audit OK: {} entries rebuilt to root {} = signed checkpoint size={}, {} inclusion proofs checked",
        report.entries, report.rebuilt_root, cp.size, report.proofs_checked
    );
    let mut proven = 0;
    for i in 0..cp.size {
        auditor.prove_entry(i, &cp).await?;
        proven += 1;
    }
    verified = verified.min(proven);

    println!(
        "== attack: alter pixel data of {} as CT-GAN would",
        files[0].display()
    );
    let mut bytes = std::fs::read(&files[0])?;
    let len = bytes.len();
    for b in &mut bytes[len - 2000..len - 1000] {
        *b = b.wrapping_add(7);
    }
    std::fs::write(&files[0], &bytes)?;
    println!("   $ medmesh ledger verify-file {}", files[0].display());
    let tampered = crate::ledger::verify_file(&auditor, &cp, &files[0]).await? == 0;
    println!("   $ medmesh ledger verify-file {}", files[1].display());
    let intact = crate::ledger::verify_file(&auditor, &cp, &files[1]).await? > 0;
    anyhow::ensure!(intact, "an unaltered instance did not verify");
    println!("== done in {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "demo transfers={} recorded={recorded} verified={verified} tamper_detected={tampered}",
        args.instances
    );
    Ok(())
}
