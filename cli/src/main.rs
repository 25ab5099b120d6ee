//! `medmesh`: verify the audit ledger, and set up local meshes.

mod archive;
mod check;
mod demo;
mod devcerts;
mod dimse;
mod ledger;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "medmesh",
    version,
    about = "medmesh: zero-trust mesh for medical imaging"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Talk to an audit ledger; every answer is verified locally.
    Ledger(Box<ledger::LedgerArgs>),
    /// Recover archived originals: found through the ledger, fetched by CID (recomputed),
    /// decrypted, and checked against the recorded hash.
    Archive(Box<archive::ArchiveArgs>),
    /// Run a local mesh on loopback: ledger, synthetic CT transfers, verified records, and a
    /// tampered instance caught.
    Demo(demo::DemoArgs),
    /// Check medmesh in the cluster of the current kubeconfig (API, CRDs, operator, webhook,
    /// identity CA, ledgers, policies, sidecar versions); exit status 1 if a check fails.
    Check(Box<check::CheckArgs>),
    /// Development helpers.
    Dev {
        #[command(subcommand)]
        cmd: DevCmd,
    },
}

#[derive(Subcommand)]
enum DevCmd {
    /// Mint a throw-away CA and SPIFFE certificates for local runs and tests.
    Certs(devcerts::CertsArgs),
    /// Write synthetic CT instances (Part 10 files) for tests and benchmarks.
    Dicom(devcerts::DicomArgs),
    /// Generate an archive key pair (age X25519): the identity into --out, the recipient to
    /// stdout. In a cluster the operator makes each namespace's.
    ArchiveKey {
        /// Where to write the identity (created, mode 0600).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One crypto provider for the whole process (aws-lc-rs: post-quantum hybrid key exchange).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Dev {
            cmd: DevCmd::Certs(args),
        } => devcerts::run(args).map(|()| ExitCode::SUCCESS),
        Cmd::Dev {
            cmd: DevCmd::Dicom(args),
        } => devcerts::dicom(args).map(|()| ExitCode::SUCCESS),
        Cmd::Dev {
            cmd: DevCmd::ArchiveKey { out },
        } => archive::keygen(&out).map(|()| ExitCode::SUCCESS),
        Cmd::Ledger(args) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(ledger::run(*args)),
            Err(e) => Err(anyhow::anyhow!("cannot start runtime: {e}")),
        },
        Cmd::Archive(args) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(archive::run(*args)),
            Err(e) => Err(anyhow::anyhow!("cannot start runtime: {e}")),
        },
        Cmd::Check(args) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(check::run(*args)),
            Err(e) => Err(anyhow::anyhow!("cannot start runtime: {e}")),
        },
        Cmd::Demo(args) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(demo::run(args)).map(|()| ExitCode::SUCCESS),
            Err(e) => Err(anyhow::anyhow!("cannot start runtime: {e}")),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
