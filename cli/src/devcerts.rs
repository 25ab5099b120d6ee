//! `medmesh dev certs`: a throw-away CA and X.509-SVIDs in a directory.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use medmesh_core::devca::{DevCa, LeafOptions};
use medmesh_core::{SpiffeId, TrustDomain};

#[derive(clap::Args)]
pub struct CertsArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Trust domain.
    #[arg(long, default_value = "medmesh.local")]
    trust_domain: String,
    /// Workloads to issue, as `<namespace>/<service-account>`; files are named `<ns>.<sa>.pem`
    /// and `<ns>.<sa>-key.pem`. An existing CA in the directory is reused.
    #[arg(long = "workload", default_values_t = ["medmesh/ledger".to_string(), "medmesh/auditor".to_string()])]
    workloads: Vec<String>,
    /// Validity of workload certificates, in hours.
    #[arg(long, default_value_t = 24)]
    hours: i64,
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(data.as_bytes())?;
    Ok(())
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let td = TrustDomain::new(&args.trust_domain)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let ca_cert = args.out.join("ca.pem");
    let ca_key = args.out.join("ca-key.pem");
    let ca = if ca_cert.exists() && ca_key.exists() {
        DevCa::from_pem(
            &std::fs::read_to_string(&ca_cert)?,
            &std::fs::read_to_string(&ca_key)?,
        )
        .context("existing CA in the output directory")?
    } else {
        let ca = DevCa::new(&td, 365)?;
        std::fs::write(&ca_cert, &ca.ca().cert_pem)?;
        write_private(&ca_key, &ca.ca().key_pem)?;
        println!("CA          {}", ca_cert.display());
        ca
    };
    let opts = LeafOptions {
        not_after: time::OffsetDateTime::now_utc() + time::Duration::hours(args.hours),
        ..LeafOptions::default()
    };
    for w in &args.workloads {
        let (ns, sa) = w
            .split_once('/')
            .with_context(|| format!("workload {w:?}: expected <namespace>/<service-account>"))?;
        let id: SpiffeId = td.workload(ns, sa)?;
        let issued = ca.issue(&id, &opts)?;
        let base = args.out.join(format!("{ns}.{sa}"));
        let cert = PathBuf::from(format!("{}.pem", base.display()));
        let key = PathBuf::from(format!("{}-key.pem", base.display()));
        std::fs::write(&cert, &issued.cert_pem)?;
        write_private(&key, &issued.key_pem)?;
        println!("{id:<40} {} {}", cert.display(), key.display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct DicomArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Number of instances (one study, one series).
    #[arg(long, default_value_t = 10)]
    count: u32,
    /// Rows and columns of each 16-bit image (512 gives 512 KiB of pixel data).
    #[arg(long, default_value_t = 512)]
    size: u16,
}

/// `medmesh dev dicom`: synthetic CT instances made by the repo itself (no downloads).
pub fn dicom(args: DicomArgs) -> anyhow::Result<()> {
    use medmesh_core::dicom::{SyntheticInstance, synthetic_ct};
    std::fs::create_dir_all(&args.out).with_context(|| format!("create {}", args.out.display()))?;
    let study = format!(
        "2.25.{}",
        u128::from_be_bytes(medmesh_core::record::RecordId::random()?.0) >> 8
    );
    for n in 0..args.count {
        let f = synthetic_ct(&SyntheticInstance {
            study_uid: study.clone(),
            series_uid: format!("{study}.1"),
            sop_instance_uid: format!("{study}.1.{}", n + 1),
            patient_name: "BENCH^SYNTHETIC".into(),
            patient_id: "BENCH-1".into(),
            rows: args.size,
            columns: args.size,
            seed: u64::from(n) + 1,
        });
        std::fs::write(args.out.join(format!("ct-{:05}.dcm", n + 1)), f)?;
    }
    Ok(())
}
